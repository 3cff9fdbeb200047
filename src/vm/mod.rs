//! The VM core, [`Vm`]: a KVM micro-VM running one guest program.
//! [`VmInstance`](crate::VmInstance) is this core with snapvm's features
//! plugged in through [`Extension`].
//!
//! Building a VM maps its memory, loads the program, sets up 64-bit long
//! mode with guest code at CPL3 and runs the guest's init function until it
//! reports *ready*. From then on, [`VmInstance::invoke`](crate::vm::Vm::invoke) runs one exported
//! guest function: the host writes the input into guest memory, resumes the
//! vCPU, and the guest answers with a single exit when the function returns
//! — one `KVM_RUN` per call.
//!
//! # Lifecycle
//! An instance is [`VmState::Ready`] after construction and after every
//! successful call. An error for which [`VmError::poisons`] is true (a guest
//! panic, fault, abort, timeout or protocol violation) leaves it
//! [`VmState::Poisoned`]: the guest stopped mid-call and every later call
//! fails with [`VmError::Poisoned`]. Drop it and build (or, with snapshots,
//! restore) a new one. Other errors — an unknown function name, an output
//! larger than the limit, a caller buffer too small — leave it ready.
//!
//! A transaction runner (`policy::Transaction`) is the exception: it can
//! rewind a call that failed inside its transaction (a timeout, a crash)
//! to the checkpoint taken at `tx::begin` and resume it, which makes the
//! instance ready again (see `docs/transactions.md`).

mod abi_page;
mod checkpoint;
mod config;
pub(crate) mod cpu;
mod dirty;
mod error;
mod ext;
mod func;
mod host;
mod hypercall;
mod interrupt;
pub(crate) mod layout;
mod loader;
pub(crate) mod machine;
pub(crate) mod persist;
pub(crate) mod poll;
pub mod raw;
mod timer;
pub(crate) mod userfault;

use std::borrow::Cow;
use std::collections::HashMap;
use std::mem::offset_of;
use std::sync::Arc;
use std::time::Duration;

pub use checkpoint::Checkpoint;
pub use config::{
    HostFn, HostFnError, HostFnWithCaller, ScratchDisk, TimeoutClock, VmConfig, DEFAULT_LOG_BUDGET,
    DEFAULT_MAX_HOST_CALL_INPUT, DEFAULT_MAX_HOST_CALL_OUTPUT, DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_OUTPUT, DEFAULT_MAX_PRESERVED, DEFAULT_MAX_PROFILE, DEFAULT_MEMORY_SIZE,
    DEFAULT_TIMEOUT, MAX_DISK_SIZE, MAX_MEMORY_SIZE, MIN_MEMORY_SIZE,
};
pub use error::{GuestFault, HypercallFault, InvalidGuest, PanicLocation, TxFault, VmError};
pub(crate) use ext::{sealed, ExtSettings, Setting};
pub use ext::{CallContext, Extension};
pub use func::Func;
pub(crate) use func::TableId;
pub use host::HostCaller;
pub use interrupt::{CancelToken, InterruptHandle};
pub use loader::GuestProgram;
pub use machine::{check_kvm, check_kvm_device, TCG_TSS_SWITCH};
pub(crate) use persist::MemorySource;
pub use persist::SnapshotId;
pub use timer::timeout_signal;

use crate::abi::{self, AbiPage, ABI_PAGE_ADDR};
pub(crate) use abi_page::check_user_range;
use abi_page::{abi_boot_words, bad, field, guest_log_level, read_str};
use config::GuestLimits;
pub(crate) use hypercall::io_exit;
use machine::Machine;

/// The user data of one call (see [`VmInstance::invoke_with`](crate::vm::Vm::invoke_with)).
pub(crate) type CallData<'a> = Option<&'a mut (dyn std::any::Any + Send)>;

/// The lifecycle state of a [`VmInstance`](crate::VmInstance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmState {
    /// Init finished and no call failed in a way that poisons: guest
    /// functions can be invoked.
    Ready,
    /// An earlier error stopped the guest mid-call; the instance cannot run
    /// guest code again.
    Poisoned,
}

/// Counters of one instance, for policies and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmStats {
    /// Guest function calls that returned successfully.
    pub invocations: u64,
    /// Bytes allocated on the guest heap after the last call.
    pub heap_used: u64,
    /// The guest's own garbage measure after the last call, if it reports
    /// one (`snapvm_guest::report_garbage`).
    pub guest_garbage: Option<u64>,
}

/// Why the vCPU stopped running guest code.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stop {
    Ready,
    Done,
    /// Polling mode: the guest stopped by itself after its window.
    Idle,
    /// Polling mode: the host stopped the vCPU (see `hypercall::Watch`).
    Parked,
}

/// A KVM micro-VM with a guest program that has finished its init.
///
/// `VmInstance` is `Send`: build it on one thread, call it from another.
/// Calls take `&mut self`; to serve requests in parallel, use one instance
/// per thread. Dropping an instance at any point releases its file
/// descriptors and memory; it owns no threads.
///
/// ```no_run
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("quickstart.elf")?);
/// let mut vm = VmInstance::new(&config)?;
/// let out = vm.invoke("reverse", b"hello")?;
/// assert_eq!(out, b"olleh");
/// # Ok(()) }
/// ```
pub struct Vm<X: Extension, D = ()> {
    machine: Machine,
    functions: HashMap<String, u64>,
    /// The table `functions` was last installed from by a restore, in the
    /// saved state's order; empty when `functions` came from the guest's
    /// `Ready`. A reset compares it with the next table to install
    /// instead of looking every name up.
    installed_functions: Vec<(String, u64)>,
    /// The identity of `functions` (see [`TableId`]): replaced with it.
    function_table: TableId,
    input_buf: u64,
    input_cap: u64,
    state: VmState,
    /// Why the instance is poisoned (no allocation on the hot path: the
    /// marks set when a call or restore starts are static).
    poison_cause: Cow<'static, str>,
    timeout: Option<Duration>,
    timeout_clock: TimeoutClock,
    max_output: u64,
    host_functions: Arc<HashMap<String, Arc<HostFnWithCaller<D>>>>,
    /// Host functions whose calls inside a transaction attempt are buffered.
    deferred: Arc<std::collections::HashSet<String>>,
    /// The embedder's data for this VM (see [`VmInstance::set_data`](crate::vm::Vm::set_data)).
    data: D,
    pending_host_result: Option<Vec<u8>>,
    pending_status: u64,
    stats: VmStats,
    generation: Generation,
    /// Dirty-page tracking: on when the config asked for it.
    dirty_tracking: bool,
    /// The snapshot this VM's memory is tracked against, if any.
    base: Option<persist::SnapshotId>,
    /// What this VM's memory maps, kept alive with it (lazy restore).
    backing: Option<Box<persist::Backing>>,
    /// The snapshot this VM was last restored from or rewound to.
    origin: Option<persist::SnapshotId>,
    /// Set when memory is filled on demand: a failed fill poisons the VM.
    memory_fault: Option<Arc<userfault::MemoryFault>>,
    /// SHA-256 of the guest program this VM runs.
    program_digest: [u8; 32],
    /// Regions (address, length) the guest asked to keep across resets.
    preserved: Vec<(u64, u64)>,
    /// Pages the guest and host wrote since `base` (see [`dirty`]).
    dirty: dirty::DirtyTracker,
    /// The guest restores its own vector state around every `Ready`/`Done`
    /// (`GUEST_FLAG_RESETS_VECTOR_STATE`).
    guest_resets_cpu: bool,
    /// The dirty log was read after the vCPU last ran (reading it again
    /// would return nothing new).
    dirty_fresh: bool,
    max_preserved: u64,
    /// End of the program area (the heap); the scratch disk lies above.
    heap_end: u64,
    /// Limits on what the host copies for the guest.
    limits: GuestLimits,
    /// Guest log bytes passed on during the current call.
    log_used: u64,
    /// The vCPU has run since its state was last completed or set: it may
    /// be in the middle of an instruction KVM completes on the next run
    /// (on VT-x and AMD-V every hypercall `out` is; see
    /// `complete_pending_exit`).
    exit_pending: bool,
    /// Shared with this VM's [`InterruptHandle`]s.
    interrupt: std::sync::Arc<interrupt::Shared>,
    /// Index of the function being called (for log fields); `None` in init.
    current_function: Option<u64>,
    /// The deadline of a polled call (the caller enforces it; host
    /// functions see it). Calls through exits carry theirs in the run loop.
    call_deadline: Option<std::time::Instant>,
    /// The request number of the polled call whose bookkeeping is current
    /// (see `run_polling`).
    polled_seq: u64,
    /// The features plugged into this VM (see [`Extension`]).
    ext: X,
}

/// Most regions a guest may preserve.
pub const MAX_PRESERVED_REGIONS: usize = 64;

/// The generation of a VM lifetime: a random 64-bit value given to the
/// guest at boot and at every restore, so restored copies of one snapshot
/// can tell themselves apart. Not ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Generation(pub u64);

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Fresh randomness from the operating system.
pub(crate) fn fresh_entropy() -> Result<(Generation, [u64; 4]), VmError> {
    let mut bytes = [0u8; 40];
    getrandom::fill(&mut bytes).map_err(|e| VmError::Entropy(std::io::Error::from(e)))?;
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    // Zero is what a never-written ABI page holds: avoid it.
    let generation = Generation(word(0).max(1));
    Ok((generation, [word(1), word(2), word(3), word(4)]))
}

impl<X: Extension, D> std::fmt::Debug for Vm<X, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmInstance")
            .field("state", &self.state)
            .field("memory_size", &self.machine.ram().size())
            .field("functions", &self.functions.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<X: Extension, D> Vm<X, D> {
    /// Builds a VM from `config` and runs the guest's init until it is
    /// ready. The config and program are validated before any KVM object is
    /// created.
    pub fn new(config: &VmConfig<D>) -> Result<Self, VmError>
    where
        D: Default,
    {
        config.validate()?;
        let machine = Machine::new(
            config.total_memory(),
            config.program.entry(),
            abi::STACK_TOP - 8,
        )?;
        config.program.load(machine.ram())?;
        if let Some(disk) = &config.scratch_disk {
            machine
                .ram()
                .write(config.memory_size, disk.bytes())
                .map_err(|_| VmError::InvalidConfig {
                    field: "scratch_disk",
                    reason: "does not fit after guest memory".into(),
                })?;
        }
        let boot = AbiPage {
            magic: abi::ABI_MAGIC,
            version: abi::ABI_VERSION,
            mem_size: config.memory_size,
            heap_start: config.program.image_end(),
            heap_end: config.memory_size,
            ..AbiPage::default()
        };
        let mut vm = Self::from_machine(machine, config)?;
        vm.write_words(field(0), &abi_boot_words(&boot))?;
        if let Some(disk) = &config.scratch_disk {
            vm.write_words(
                field(offset_of!(AbiPage, disk_addr)),
                &[config.memory_size, disk.size()],
            )?;
        }
        vm.new_generation()?;
        vm.write_words(field(offset_of!(AbiPage, log_level)), &[guest_log_level()])?;
        match vm.run(None)? {
            Stop::Ready => vm.read_ready()?,
            Stop::Done | Stop::Idle | Stop::Parked => {
                return Err(bad(
                    "Ready",
                    HypercallFault::OutOfSequence("Done before Ready"),
                ));
            }
        }
        Ok(vm)
    }

    /// An instance around `machine` with no guest state yet.
    pub(crate) fn from_machine(machine: Machine, config: &VmConfig<D>) -> Result<Self, VmError>
    where
        D: Default,
    {
        Ok(Self {
            machine,
            functions: HashMap::new(),
            installed_functions: Vec::new(),
            function_table: TableId::EMPTY,
            input_buf: 0,
            input_cap: 0,
            state: VmState::Ready,
            poison_cause: Cow::Borrowed(""),
            timeout: config.timeout,
            timeout_clock: config.timeout_clock,
            max_output: config.max_output,
            host_functions: Arc::clone(&config.host_functions),
            deferred: Arc::clone(&config.deferred),
            pending_host_result: None,
            pending_status: 0,
            stats: VmStats::default(),
            generation: Generation(0),
            dirty_tracking: config.dirty_tracking,
            base: None,
            backing: None,
            memory_fault: None,
            origin: None,
            program_digest: *config.program.digest(),
            preserved: Vec::new(),
            dirty: dirty::DirtyTracker::default(),
            guest_resets_cpu: false,
            dirty_fresh: false,
            max_preserved: config.max_preserved,
            heap_end: config.memory_size,
            limits: config.limits,
            log_used: 0,
            exit_pending: false,
            interrupt: std::sync::Arc::default(),
            current_function: None,
            call_deadline: None,
            polled_seq: 0,
            data: D::default(),
            ext: X::open(config)?,
        })
    }

    /// The features plugged into this VM.
    pub(crate) fn ext(&self) -> &X {
        &self.ext
    }

    /// The features plugged into this VM.
    pub(crate) fn ext_mut(&mut self) -> &mut X {
        &mut self.ext
    }

    /// Gives the guest a new generation and fresh entropy (before it runs again).
    pub(crate) fn new_generation(&mut self) -> Result<(), VmError> {
        let (generation, entropy) = fresh_entropy()?;
        let mut words = [0u64; 5];
        words[0] = generation.0;
        words[1..].copy_from_slice(&entropy);
        self.write_words(field(offset_of!(AbiPage, generation)), &words)?;
        self.generation = generation;
        Ok(())
    }

    /// The generation of this VM lifetime (see [`Generation`]).
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// A handle that stops this VM's running call from another thread (see
    /// [`InterruptHandle`]).
    pub fn interrupt_handle(&self) -> InterruptHandle {
        InterruptHandle {
            shared: std::sync::Arc::clone(&self.interrupt),
        }
    }

    /// The instance's lifecycle state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Counters of this instance.
    pub fn stats(&self) -> VmStats {
        self.stats
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.machine.ram().size()
    }

    /// Names of the functions the guest exported, in no particular order.
    pub fn functions(&self) -> impl Iterator<Item = &str> {
        self.functions.keys().map(String::as_str)
    }

    /// Whether the guest exported function `name`.
    pub(crate) fn has_function(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }

    /// Calls guest function `name` with `input` and returns its output.
    pub fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, VmError> {
        self.invoke_with_data(name, input, None)
    }

    pub(crate) fn invoke_with_data(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: CallData<'_>,
    ) -> Result<Vec<u8>, VmError> {
        let output = self.call_raw(name, input, call_data)?;
        self.output_vec(output)
    }

    /// Copies a call's output (its guest address and length) out.
    fn output_vec(&mut self, (ptr, len): (u64, u64)) -> Result<Vec<u8>, VmError> {
        let mut out = vec![0; len as usize];
        self.read_output(ptr, &mut out)?;
        Ok(out)
    }

    /// Calls a typed guest function (exported with
    /// `Exports::export_typed`): `input` is encoded with
    /// [postcard](https://docs.rs/postcard), the output decoded as `Out`.
    /// Bytes in and out ([`Self::invoke`]) stay the zero-copy core; this
    /// adds one encode and one decode. A guest `Err` is
    /// [`VmError::GuestError`]; an output that does not decode as `Out` is
    /// [`VmError::Decode`]. Neither poisons.
    ///
    /// ```no_run
    /// # #[cfg(feature = "serde")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use snapvm::{GuestProgram, VmConfig, VmInstance};
    ///
    /// #[derive(serde::Serialize)]
    /// struct Order { items: u32, price_cents: u64 }
    /// #[derive(serde::Deserialize)]
    /// struct Total { cents: u64 }
    ///
    /// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?);
    /// let mut vm = VmInstance::new(&config)?;
    /// let total: Total = vm.call("total", &Order { items: 3, price_cents: 250 })?;
    /// assert_eq!(total.cents, 750);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "serde"))]
    /// # fn main() {}
    /// ```
    #[cfg(feature = "serde")]
    pub fn call<In, Out>(&mut self, name: &str, input: &In) -> Result<Out, VmError>
    where
        In: serde::Serialize + ?Sized,
        Out: serde::de::DeserializeOwned,
    {
        typed_call(input, |bytes| self.invoke(name, bytes))
    }

    /// Like [`Self::invoke`], cancellable through `cancel` (see
    /// [`CancelToken`]): a cancel made at any time before the call returns
    /// — even before it starts — stops it with [`VmError::Cancelled`]
    /// (which poisons), and one made after it returned stops nothing.
    /// A token already used for another call is refused
    /// ([`VmError::InvalidConfig`]; nothing runs).
    pub fn invoke_cancellable(
        &mut self,
        name: &str,
        input: &[u8],
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, VmError> {
        // Cancelled before it started: no guest code runs, and the VM is
        // poisoned like after any cancel (`poison` leaves other errors be).
        let _bound = cancel.bind(&self.interrupt).map_err(|e| self.poison(e))?;
        self.invoke_with_data(name, input, None)
    }

    /// Like [`Self::invoke`], with `call_data` for the host functions the
    /// call makes: they see it as
    /// [`HostCaller::call_data`](HostCaller::call_data) (a request id, a
    /// per-request budget, a connection to answer on).
    pub fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn std::any::Any + Send),
    ) -> Result<Vec<u8>, VmError> {
        self.invoke_with_data(name, input, Some(call_data))
    }

    /// Sets the embedder's data of this VM (the tenant, a database
    /// handle, counters), of the type its config names
    /// ([`VmConfig::data_type`]); host functions reach it through
    /// [`HostCaller::data`]. Replaces what was there. The data belongs to
    /// the host: it is not in snapshots, and resets and restores in place
    /// keep it.
    pub fn set_data(&mut self, data: D) {
        self.data = data;
    }

    /// The VM's data (see [`Self::set_data`]).
    pub fn data(&self) -> &D {
        &self.data
    }

    /// The VM's data, to change in place (see [`Self::set_data`]).
    pub fn data_mut(&mut self) -> &mut D {
        &mut self.data
    }

    /// Calls guest function `name` with `input` and writes its output into
    /// `output`, returning the output length. Allocates nothing on the host.
    ///
    /// If the output is longer than `output`, fails with
    /// [`VmError::OutputBufferTooSmall`] (carrying the needed length) and the
    /// instance stays ready.
    pub fn invoke_into(
        &mut self,
        name: &str,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, VmError> {
        let (ptr, len) = self.call_raw(name, input, None)?;
        let len = len as usize;
        let capacity = output.len();
        let dest = output.get_mut(..len).ok_or(VmError::OutputBufferTooSmall {
            needed: len,
            capacity,
        })?;
        self.read_output(ptr, dest)?;
        Ok(len)
    }

    fn read_output(&mut self, ptr: u64, out: &mut [u8]) -> Result<(), VmError> {
        let result = self
            .machine
            .ram()
            .read(ptr, out)
            .map_err(|e| bad("Done", e.into()))
            // Never hand out bytes read from a stand-in for failed memory.
            .and_then(|()| self.check_memory());
        result.map_err(|e| self.poison(e))
    }

    /// Fails if memory filled on demand could not be filled.
    pub(crate) fn check_memory(&self) -> Result<(), VmError> {
        match &self.memory_fault {
            Some(fault) => fault.check(),
            None => Ok(()),
        }
    }

    /// Makes a failure to fill this VM's memory poison it and kick its vCPU.
    pub(crate) fn set_memory_fault(&mut self, fault: Arc<userfault::MemoryFault>) {
        fault.set_interrupt(self.interrupt_handle());
        self.memory_fault = Some(fault);
    }

    /// Runs one call and returns the guest address and length of its output.
    fn call_raw(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: CallData<'_>,
    ) -> Result<(u64, u64), VmError> {
        self.check_ready()?;
        let index = self.function_index(name)?;
        self.call_index(index, input, call_data)
    }

    /// Fails with [`VmError::Poisoned`] if the instance is poisoned.
    fn check_ready(&self) -> Result<(), VmError> {
        match self.state {
            VmState::Ready => Ok(()),
            VmState::Poisoned => Err(VmError::Poisoned {
                cause: self.poison_cause.to_string(),
            }),
        }
    }

    /// Runs one call of function `index` of the current table on a ready
    /// instance (see [`Self::check_ready`]).
    fn call_index(
        &mut self,
        index: u64,
        input: &[u8],
        call_data: CallData<'_>,
    ) -> Result<(u64, u64), VmError> {
        // Poisoned until the call provably finished: a host panic unwinding
        // out of here leaves no instance that claims to be ready.
        self.state = VmState::Poisoned;
        self.poison_cause = Cow::Borrowed("a call did not finish");
        let result = self.call_inner(index, input, call_data);
        self.finish(result)
    }

    /// Ends a call, reset or restore that marked the instance poisoned when
    /// it started: ready again unless `result` is an error that poisons.
    fn finish<T>(&mut self, result: Result<T, VmError>) -> Result<T, VmError> {
        match result {
            Err(e) if e.poisons() => {
                self.poison_cause = Cow::Owned(e.to_string());
                Err(e)
            }
            other => {
                self.state = VmState::Ready;
                self.poison_cause = Cow::Borrowed("");
                other
            }
        }
    }

    fn call_inner(
        &mut self,
        index: u64,
        input: &[u8],
        mut call_data: CallData<'_>,
    ) -> Result<(u64, u64), VmError> {
        self.begin_call(index, None);
        // Not polling: the guest answers every request with `Done` (see
        // `poll.rs`).
        self.write_words(field(offset_of!(AbiPage, poll_window)), &[0])?;
        let len = input.len() as u64;
        if len > self.input_cap {
            self.grow_input(input.len(), call_data.as_deref_mut())?;
        }
        self.machine
            .ram()
            .write(self.input_buf, input)
            .map_err(|e| bad("Ready", e.into()))?;
        self.note_host_write(self.input_buf, len);
        self.write_words(
            field(offset_of!(AbiPage, request)),
            &[abi::REQUEST_CALL, index, len],
        )?;
        self.write_words(field(offset_of!(AbiPage, log_level)), &[guest_log_level()])?;
        self.finish_call(call_data)
    }

    /// The bookkeeping every call starts with, whichever way it reaches
    /// the guest: through an exit (`call_inner`) or posted to a polling
    /// guest (`run_polling` runs it at the call's first hypercall). Nothing
    /// of the previous call's host-side state — its transaction, its
    /// pending host result, its log budget, its name — reaches this one.
    pub(crate) fn begin_call(&mut self, index: u64, deadline: Option<std::time::Instant>) {
        self.pending_host_result = None;
        self.log_used = 0;
        self.ext.call_start();
        self.current_function = Some(index);
        self.call_deadline = deadline;
    }

    /// Runs a started call (or a rewound transaction attempt) to `Done` and
    /// reads its result.
    fn finish_call(&mut self, call_data: CallData<'_>) -> Result<(u64, u64), VmError> {
        self.expect_done(call_data)?;
        self.ext.call_end()?;
        let report = abi_page::read_result(self.machine.ram(), self.result_limits());
        self.check_memory()?;
        let report = report?;
        self.stats.heap_used = report.heap_used;
        self.stats.guest_garbage =
            (report.garbage != abi::GARBAGE_UNREPORTED).then_some(report.garbage);
        let (output_ptr, output_len) = report.output?;
        self.stats.invocations += 1;
        Ok((output_ptr, output_len))
    }

    /// Asks the guest for an input buffer of at least `len` bytes.
    fn grow_input(&mut self, len: usize, call_data: CallData<'_>) -> Result<(), VmError> {
        self.machine
            .ram()
            .check(0, len as u64)
            .map_err(|_| VmError::InputTooLarge { len })?;
        self.write_words(
            field(offset_of!(AbiPage, request)),
            &[abi::REQUEST_GROW_INPUT, 0, len as u64],
        )?;
        self.expect_done(call_data)?;
        let [status] = self.read_words::<1>(field(offset_of!(AbiPage, status)))?;
        self.read_input_buffer()?;
        match status {
            abi::STATUS_OK if self.input_cap >= len as u64 => Ok(()),
            abi::STATUS_OK => Err(bad(
                "Done",
                HypercallFault::InputBufferTooSmall {
                    wanted: len as u64,
                    offered: self.input_cap,
                },
            )),
            abi::STATUS_OUT_OF_MEMORY => Err(VmError::InputTooLarge { len }),
            other => Err(bad("Done", HypercallFault::BadStatus(other))),
        }
    }

    fn expect_done(&mut self, call_data: CallData<'_>) -> Result<(), VmError> {
        match self.run(call_data)? {
            Stop::Done => Ok(()),
            Stop::Ready => Err(bad(
                "Ready",
                HypercallFault::OutOfSequence("Ready after init"),
            )),
            Stop::Idle | Stop::Parked => Err(bad(
                "Idle",
                HypercallFault::OutOfSequence("a polling stop outside polling mode"),
            )),
        }
    }

    /// Marks the instance ready again (after its state was replaced).
    pub(crate) fn clear_poison(&mut self) {
        self.state = VmState::Ready;
        self.poison_cause = Cow::Borrowed("");
        self.pending_host_result = None;
    }

    /// Marks the instance poisoned while `step` replaces its state; only
    /// [`Self::clear_poison`] at the end of a successful step undoes it.
    pub(crate) fn begin_replace(&mut self, step: &'static str) {
        self.state = VmState::Poisoned;
        self.poison_cause = Cow::Borrowed(step);
    }

    fn poison(&mut self, error: VmError) -> VmError {
        if error.poisons() && self.state != VmState::Poisoned {
            self.state = VmState::Poisoned;
            self.poison_cause = Cow::Owned(error.to_string());
        }
        error
    }

    /// Reads the function table and input buffer the guest reported at Ready.
    fn read_ready(&mut self) -> Result<(), VmError> {
        let [version_words] = self.read_words::<1>(field(offset_of!(AbiPage, version)))?;
        let guest_version = (version_words >> 32) as u32;
        if guest_version != abi::ABI_VERSION {
            return Err(VmError::AbiMismatch {
                guest: guest_version,
                host: abi::ABI_VERSION,
            });
        }
        let [table, count] = self.read_words::<2>(field(offset_of!(AbiPage, func_table)))?;
        if count > abi::MAX_FUNCTIONS {
            return Err(bad(
                "Ready",
                HypercallFault::TooLong {
                    len: count,
                    limit: abi::MAX_FUNCTIONS,
                },
            ));
        }
        let ram = self.machine.ram();
        check_user_range(ram.size(), table, count * 16).map_err(|e| bad("Ready", e))?;
        let entries = ram
            .read_vec(table, count * 16)
            .map_err(|e| bad("Ready", e.into()))?;
        let mut functions = HashMap::with_capacity(count as usize);
        for (index, entry) in entries.chunks_exact(16).enumerate() {
            let ptr = u64::from_le_bytes(entry[..8].try_into().expect("8-byte slice"));
            let len = u64::from_le_bytes(entry[8..].try_into().expect("8-byte slice"));
            let name = read_str(ram, ptr, len, abi::MAX_FUNCTION_NAME, false)
                .map_err(|e| bad("Ready", e))?;
            if functions.insert(name.clone(), index as u64).is_some() {
                return Err(bad("Ready", HypercallFault::DuplicateFunction(name)));
            }
        }
        self.functions = functions;
        self.function_table = TableId::fresh();
        self.installed_functions.clear();
        let [flags] = self.read_words::<1>(field(offset_of!(AbiPage, guest_flags)))?;
        self.guest_resets_cpu = flags & abi::GUEST_FLAG_RESETS_VECTOR_STATE != 0;
        self.read_input_buffer()?;
        let [heap_used] = self.read_words::<1>(field(offset_of!(AbiPage, heap_used)))?;
        self.stats.heap_used = heap_used;
        Ok(())
    }

    fn read_input_buffer(&mut self) -> Result<(), VmError> {
        let [buf, cap] = self.read_words::<2>(field(offset_of!(AbiPage, input_buf)))?;
        check_user_range(self.memory_size(), buf, cap).map_err(|e| bad("Ready", e))?;
        self.input_buf = buf;
        self.input_cap = cap;
        Ok(())
    }

    /// Copies guest memory at `addr` into `buf`, for inspection (debuggers,
    /// tests). The vCPU is stopped whenever the caller holds the VM.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.machine
            .ram()
            .read(addr, buf)
            .map_err(|e| VmError::MemoryOutOfRange {
                addr: e.addr,
                len: e.len,
            })?;
        // Never hand out a stand-in for memory that could not be filled.
        self.check_memory()
    }

    /// The regions the guest asked to keep across resets.
    pub fn preserved_regions(&self) -> &[(u64, u64)] {
        &self.preserved
    }

    /// Reads KVM's dirty log into the VM's running set and returns how many
    /// pages the guest wrote since the previous read (0 without tracking).
    pub(crate) fn collect_dirty(&mut self) -> Result<u64, VmError> {
        if !self.dirty_tracking || self.base.is_none() || self.dirty_fresh {
            return Ok(0);
        }
        let log = self.machine.peek_dirty_log()?;
        self.dirty_fresh = true;
        Ok(self.dirty.absorb(&log))
    }

    /// Pages the guest wrote since the VM was last at its tracked snapshot
    /// (as of the last [`Self::collect_dirty`]).
    pub(crate) fn dirty_since_base(&self) -> u64 {
        self.dirty.count()
    }

    /// The pages written since the tracked snapshot (guest writes from
    /// KVM's log, host writes, and the ABI page, which every call writes),
    /// sorted and without duplicates. Forgets nothing until
    /// [`Self::commit_dirty`]: a rewind that fails half-way keeps them all.
    pub(crate) fn pending_dirty_pages(&mut self) -> Result<Vec<u64>, VmError> {
        self.collect_dirty()?;
        Ok(self
            .dirty
            .pending(ABI_PAGE_ADDR / abi::PAGE_SIZE, abi::PAGE_SIZE))
    }

    /// Starts a new dirty set once the pages of the last
    /// [`Self::pending_dirty_pages`] were rewound, and write-protects them
    /// again (all but the hot ones; the hot pages in `demote` too).
    pub(crate) fn commit_dirty(&mut self, demote: &[u64]) -> Result<(), VmError> {
        if let Some((first_word, bitmap)) = self.dirty.commit(demote) {
            self.machine.clear_dirty_log(first_word, &bitmap)?;
        }
        Ok(())
    }

    /// Forgets every recorded write (after memory was rewound wholesale and
    /// the dirty log cleared).
    pub(crate) fn clear_dirty(&mut self) {
        self.dirty.clear();
    }

    /// Records a host write into guest memory for dirty tracking.
    pub(crate) fn note_host_write(&mut self, addr: u64, len: u64) {
        if self.dirty_tracking {
            self.dirty.note_host_write(addr, len);
        }
    }

    /// The index of exported function `name` in the current table.
    pub(crate) fn function_index(&self, name: &str) -> Result<u64, VmError> {
        self.functions
            .get(name)
            .copied()
            .ok_or_else(|| VmError::UnknownFunction {
                name: name.to_string(),
            })
    }

    /// The identity of the current function table (see [`TableId`]).
    pub(crate) fn function_table(&self) -> TableId {
        self.function_table
    }

    /// Like [`Self::invoke_with_data`], for a function resolved earlier:
    /// by its index when this VM's table is the one `func` was resolved
    /// from, by its name otherwise. The same call path either way.
    pub(crate) fn invoke_resolved(
        &mut self,
        func: &Func,
        input: &[u8],
        call_data: CallData<'_>,
    ) -> Result<Vec<u8>, VmError> {
        self.check_ready()?;
        let index = match func.index_in(self.function_table) {
            Some(index) => index,
            None => self.function_index(func.name())?,
        };
        let output = self.call_index(index, input, call_data)?;
        self.output_vec(output)
    }
}

pub(crate) use layout::{page_table_pages, write_system_area_checked as write_system_area};

/// A typed call through `invoke` (bytes in, bytes out): the one encoding
/// and decoding every call surface uses.
#[cfg(feature = "serde")]
pub(crate) fn typed_call<In, Out, E>(
    input: &In,
    invoke: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<Out, E>
where
    In: serde::Serialize + ?Sized,
    Out: serde::de::DeserializeOwned,
    E: From<VmError>,
{
    let bytes = encode_typed(input)?;
    let output = invoke(&bytes)?;
    Ok(decode_typed(&output)?)
}

/// Encodes the input of a typed call.
#[cfg(feature = "serde")]
fn encode_typed<In: serde::Serialize + ?Sized>(input: &In) -> Result<Vec<u8>, VmError> {
    postcard::to_allocvec(input).map_err(|e| VmError::Encode {
        reason: e.to_string(),
    })
}

/// Decodes the output of a typed call.
#[cfg(feature = "serde")]
fn decode_typed<Out: serde::de::DeserializeOwned>(output: &[u8]) -> Result<Out, VmError> {
    postcard::from_bytes(output).map_err(|e| VmError::Decode {
        reason: e.to_string(),
    })
}
