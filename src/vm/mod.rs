//! [`VmInstance`]: a KVM micro-VM running one guest program.
//!
//! Building a VM maps its memory, loads the program, sets up 64-bit long
//! mode with guest code at CPL3 and runs the guest's init function until it
//! reports *ready*. From then on, [`VmInstance::invoke`] runs one exported
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

mod config;
mod dirty;
mod error;
mod layout;
mod loader;
pub(crate) mod machine;
pub(crate) mod memory;
pub mod raw;
mod timer;

use std::collections::HashMap;
use std::mem::offset_of;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

pub use config::{
    HostFn, HostFnError, ScratchDisk, VmConfig, DEFAULT_LOG_BUDGET, DEFAULT_MAX_HOST_CALL_INPUT,
    DEFAULT_MAX_HOST_CALL_OUTPUT, DEFAULT_MAX_MESSAGE, DEFAULT_MAX_OUTPUT, DEFAULT_MAX_PRESERVED,
    DEFAULT_MEMORY_SIZE, DEFAULT_TIMEOUT, MAX_DISK_SIZE, MAX_MEMORY_SIZE, MIN_MEMORY_SIZE,
};
pub use error::{GuestFault, HypercallFault, InvalidGuest, PanicLocation, VmError};
pub use loader::GuestProgram;
pub use machine::{check_kvm, check_kvm_device};
pub use timer::timeout_signal;

use crate::abi::{self, AbiPage, Hypercall, ABI_PAGE_ADDR, PORT_FAULT, PORT_HYPERCALL};
use config::GuestLimits;
use machine::Machine;

/// Longest source file name in a panic location.
const MAX_FILE_NAME: u64 = 4096;

/// Checks that `[addr, addr + len)` is memory guest code can read and write
/// at CPL3: the user stack and the program area up to the end of guest
/// memory (`size`, scratch disk included). The null guard, the ABI page,
/// the supervisor-only system area and the stack guard are refused, so a
/// guest can never make the host read or write there on its behalf. Empty
/// buffers are accepted anywhere (a guest passes dangling pointers for
/// them); the host touches none of their bytes.
pub(crate) fn check_user_range(size: u64, addr: u64, len: u64) -> Result<(), HypercallFault> {
    if len == 0 {
        return Ok(());
    }
    let inside = addr >= abi::STACK_BOTTOM && addr.checked_add(len).is_some_and(|end| end <= size);
    if inside {
        Ok(())
    } else {
        Err(HypercallFault::NotGuestMemory { addr, len })
    }
}

/// The lifecycle state of a [`VmInstance`].
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
enum Stop {
    Ready,
    Done,
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
pub struct VmInstance {
    pub(crate) machine: Machine,
    pub(crate) functions: HashMap<String, u64>,
    pub(crate) input_buf: u64,
    pub(crate) input_cap: u64,
    pub(crate) state: VmState,
    poison_cause: String,
    timeout: Option<Duration>,
    max_output: u64,
    host_functions: Arc<HashMap<String, Arc<HostFn>>>,
    pending_host_result: Option<Vec<u8>>,
    pending_status: u64,
    pub(crate) stats: VmStats,
    pub(crate) generation: Generation,
    /// Dirty-page tracking: on when the config asked for it.
    pub(crate) dirty_tracking: bool,
    /// The snapshot this VM's memory is tracked against, if any.
    pub(crate) base: Option<crate::snapshot::SnapshotId>,
    /// The snapshot whose image backs this VM's memory (lazy restore).
    pub(crate) backing: Option<crate::snapshot::Snapshot>,
    /// SHA-256 of the guest program this VM runs.
    pub(crate) program_digest: [u8; 32],
    /// Regions (address, length) the guest asked to keep across resets.
    pub(crate) preserved: Vec<(u64, u64)>,
    /// Pages the guest and host wrote since `base` (see [`dirty`]).
    dirty: dirty::DirtyTracker,
    /// The guest restores its own vector state around every `Ready`/`Done`
    /// (`GUEST_FLAG_RESETS_VECTOR_STATE`).
    pub(crate) guest_resets_cpu: bool,
    /// The dirty log was read after the vCPU last ran (reading it again
    /// would return nothing new).
    dirty_fresh: bool,
    pub(crate) max_preserved: u64,
    /// End of the program area (the heap); the scratch disk lies above.
    heap_end: u64,
    /// Limits on what the host copies for the guest.
    limits: GuestLimits,
    /// Guest log bytes passed on during the current call.
    log_used: u64,
    /// The vCPU stopped in an exit that is not a complete hypercall (it may
    /// be in the middle of an instruction KVM completes on the next run).
    pub(crate) exit_pending: bool,
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

impl std::fmt::Debug for VmInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmInstance")
            .field("state", &self.state)
            .field("memory_size", &self.machine.ram.size())
            .field("functions", &self.functions.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

const fn field(offset: usize) -> u64 {
    ABI_PAGE_ADDR + offset as u64
}

const ARGS: u64 = field(offset_of!(AbiPage, args));
const RET: u64 = field(offset_of!(AbiPage, ret));

impl VmInstance {
    /// Builds a VM from `config` and runs the guest's init until it is
    /// ready. The config and program are validated before any KVM object is
    /// created.
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        config.validate()?;
        let machine = Machine::new(
            config.total_memory(),
            config.program.entry(),
            abi::STACK_TOP - 8,
        )?;
        config.program.load(&machine.ram)?;
        if let Some(disk) = &config.scratch_disk {
            machine
                .ram
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
        let mut vm = Self::from_machine(machine, config);
        vm.write_words(field(0), &abi_boot_words(&boot))?;
        if let Some(disk) = &config.scratch_disk {
            vm.write_words(
                field(offset_of!(AbiPage, disk_addr)),
                &[config.memory_size, disk.size()],
            )?;
        }
        vm.new_generation()?;
        match vm.run()? {
            Stop::Ready => vm.read_ready()?,
            Stop::Done => {
                return Err(bad(
                    "Ready",
                    HypercallFault::OutOfSequence("Done before Ready"),
                ));
            }
        }
        Ok(vm)
    }

    /// An instance around `machine` with no guest state yet.
    pub(crate) fn from_machine(machine: Machine, config: &VmConfig) -> Self {
        Self {
            machine,
            functions: HashMap::new(),
            input_buf: 0,
            input_cap: 0,
            state: VmState::Ready,
            poison_cause: String::new(),
            timeout: config.timeout,
            max_output: config.max_output,
            host_functions: Arc::clone(&config.host_functions),
            pending_host_result: None,
            pending_status: 0,
            stats: VmStats::default(),
            generation: Generation(0),
            dirty_tracking: config.dirty_tracking,
            base: None,
            backing: None,
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
        }
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
        self.machine.ram.size()
    }

    /// Names of the functions the guest exported, in no particular order.
    pub fn functions(&self) -> impl Iterator<Item = &str> {
        self.functions.keys().map(String::as_str)
    }

    /// Calls guest function `name` with `input` and returns its output.
    pub fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, VmError> {
        let (ptr, len) = self.call(name, input)?;
        let mut out = vec![0; len as usize];
        self.read_output(ptr, &mut out)?;
        Ok(out)
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
        let (ptr, len) = self.call(name, input)?;
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
            .ram
            .read(ptr, out)
            .map_err(|e| bad("Done", e.into()));
        result.map_err(|e| self.poison(e))
    }

    /// Runs one call and returns the guest address and length of its output.
    fn call(&mut self, name: &str, input: &[u8]) -> Result<(u64, u64), VmError> {
        if self.state == VmState::Poisoned {
            return Err(VmError::Poisoned {
                cause: self.poison_cause.clone(),
            });
        }
        let index = *self
            .functions
            .get(name)
            .ok_or_else(|| VmError::UnknownFunction {
                name: name.to_string(),
            })?;
        // Poisoned until the call provably finished: a host panic unwinding
        // out of here leaves no instance that claims to be ready.
        self.state = VmState::Poisoned;
        self.poison_cause = format!("call to {name:?} did not finish");
        let result = self.call_inner(index, input);
        self.finish(result)
    }

    /// Ends a call, reset or restore that marked the instance poisoned when
    /// it started: ready again unless `result` is an error that poisons.
    fn finish<T>(&mut self, result: Result<T, VmError>) -> Result<T, VmError> {
        match result {
            Err(e) if e.poisons() => {
                self.poison_cause = e.to_string();
                Err(e)
            }
            other => {
                self.state = VmState::Ready;
                self.poison_cause.clear();
                other
            }
        }
    }

    fn call_inner(&mut self, index: u64, input: &[u8]) -> Result<(u64, u64), VmError> {
        self.pending_host_result = None;
        self.log_used = 0;
        let len = input.len() as u64;
        if len > self.input_cap {
            self.grow_input(input.len())?;
        }
        self.machine
            .ram
            .write(self.input_buf, input)
            .map_err(|e| bad("Ready", e.into()))?;
        self.note_host_write(self.input_buf, len);
        self.write_words(
            field(offset_of!(AbiPage, request)),
            &[abi::REQUEST_CALL, index, len],
        )?;
        self.expect_done()?;
        let [output_ptr, output_len, status, heap_used] =
            self.read_words::<4>(field(offset_of!(AbiPage, output_ptr)))?;
        let [garbage] = self.read_words::<1>(field(offset_of!(AbiPage, garbage)))?;
        self.stats.heap_used = heap_used;
        self.stats.guest_garbage = (garbage != abi::GARBAGE_UNREPORTED).then_some(garbage);
        if status != abi::STATUS_OK {
            return Err(bad("Done", HypercallFault::BadStatus(status)));
        }
        check_user_range(self.memory_size(), output_ptr, output_len).map_err(|e| bad("Done", e))?;
        if output_len > self.max_output {
            return Err(VmError::OutputTooLarge {
                len: output_len,
                limit: self.max_output,
            });
        }
        self.stats.invocations += 1;
        Ok((output_ptr, output_len))
    }

    /// Asks the guest for an input buffer of at least `len` bytes.
    fn grow_input(&mut self, len: usize) -> Result<(), VmError> {
        self.machine
            .ram
            .check(0, len as u64)
            .map_err(|_| VmError::InputTooLarge { len })?;
        self.write_words(
            field(offset_of!(AbiPage, request)),
            &[abi::REQUEST_GROW_INPUT, 0, len as u64],
        )?;
        self.expect_done()?;
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

    fn expect_done(&mut self) -> Result<(), VmError> {
        match self.run()? {
            Stop::Done => Ok(()),
            Stop::Ready => Err(bad(
                "Ready",
                HypercallFault::OutOfSequence("Ready after init"),
            )),
        }
    }

    /// Marks the instance ready again (after its state was replaced).
    pub(crate) fn clear_poison(&mut self) {
        self.state = VmState::Ready;
        self.poison_cause.clear();
        self.pending_host_result = None;
    }

    /// Marks the instance poisoned while `step` replaces its state; only
    /// [`Self::clear_poison`] at the end of a successful step undoes it.
    pub(crate) fn begin_replace(&mut self, step: &str) {
        self.state = VmState::Poisoned;
        self.poison_cause = format!("{step} did not finish");
    }

    fn poison(&mut self, error: VmError) -> VmError {
        if error.poisons() && self.state != VmState::Poisoned {
            self.state = VmState::Poisoned;
            self.poison_cause = error.to_string();
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
        let ram = &self.machine.ram;
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

    /// Runs the vCPU until the guest reports Ready or Done, serving the
    /// hypercalls it makes on the way.
    fn run(&mut self) -> Result<Stop, VmError> {
        self.dirty_fresh = false;
        let deadline = self.timeout.map(|limit| (Instant::now() + limit, limit));
        // Disarmed on every way out, a panic unwinding through here included.
        let _armed = match deadline {
            Some((_, limit)) => Some(timer::Armed::new(limit).map_err(VmError::Timer)?),
            None => None,
        };
        self.run_loop(deadline)
    }

    fn run_loop(&mut self, deadline: Option<(Instant, Duration)>) -> Result<Stop, VmError> {
        loop {
            self.exit_pending = true;
            let Some((port, value, size)) = io_exit(self.machine.vcpu.run())? else {
                if let Some((at, limit)) = deadline {
                    if Instant::now() >= at {
                        return Err(VmError::Timeout { limit });
                    }
                }
                continue;
            };
            // A hypercall is one 32-bit `out`; anything else at the port (a
            // narrow write, string I/O of several elements) is refused, and
            // the vCPU stays marked as stopped mid-instruction.
            if port == PORT_HYPERCALL && size != 4 {
                return Err(VmError::UnexpectedExit {
                    exit: format!("{size}-byte write to the hypercall port"),
                });
            }
            match port {
                PORT_HYPERCALL => match Hypercall::from_u32(value) {
                    Some(Hypercall::Ready) => return Ok(Stop::Ready),
                    Some(Hypercall::Done) => return Ok(Stop::Done),
                    Some(Hypercall::Log) => self.hypercall_log()?,
                    Some(Hypercall::HostCall) => self.hypercall_host_call(deadline)?,
                    Some(Hypercall::HostResult) => self.hypercall_host_result()?,
                    Some(Hypercall::Panic) => return Err(self.hypercall_panic()),
                    Some(Hypercall::Abort) => return Err(self.hypercall_abort()),
                    Some(Hypercall::Preserve) => self.hypercall_preserve()?,
                    Some(Hypercall::OutOfMemory) => {
                        let [requested] = self.read_words::<1>(ARGS)?;
                        let [heap_used] =
                            self.read_words::<1>(field(offset_of!(AbiPage, heap_used)))?;
                        return Err(VmError::GuestOutOfMemory {
                            requested,
                            heap_used,
                        });
                    }
                    None => return Err(VmError::UnknownHypercall { nr: value }),
                },
                PORT_FAULT => return Err(self.read_fault()),
                _ => {
                    return Err(VmError::UnexpectedExit {
                        exit: format!("write to I/O port {port:#x}"),
                    })
                }
            }
        }
    }

    /// Brings the vCPU out of any instruction it stopped in the middle of
    /// (a port read, string I/O, MMIO): KVM would otherwise complete it on
    /// the next `KVM_RUN`, *after* registers were rewound, and resume the
    /// previous request's code. A `KVM_RUN` with `immediate_exit` set
    /// completes what is pending without entering the guest; what it
    /// completes is overwritten by the rewind that follows.
    pub(crate) fn complete_pending_exit(&mut self) -> Result<(), VmError> {
        if !self.exit_pending {
            return Ok(());
        }
        /// KVM completes string I/O one batch (at most a page) per run:
        /// bound the rounds. A guest whose `rep ins` runs longer than this
        /// leaves a VM that cannot be rewound (`VcpuStuck`); drop it.
        const ROUNDS: usize = 4096;
        let vcpu = &mut self.machine.vcpu;
        vcpu.set_kvm_immediate_exit(1);
        let mut last = String::new();
        let mut done = false;
        for _ in 0..ROUNDS {
            match vcpu.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    done = true;
                    break;
                }
                Err(source) => {
                    vcpu.set_kvm_immediate_exit(0);
                    return Err(VmError::Kvm {
                        step: "KVM_RUN (completing a pending exit)",
                        source,
                    });
                }
                Ok(VcpuExit::IoIn(_, data)) => {
                    data.fill(0);
                    last = "port read".into();
                }
                Ok(VcpuExit::MmioRead(_, data)) => {
                    data.fill(0);
                    last = "MMIO read".into();
                }
                Ok(other) => last = format!("{other:?}"),
            }
        }
        vcpu.set_kvm_immediate_exit(0);
        if !done {
            return Err(VmError::VcpuStuck { exit: last });
        }
        self.exit_pending = false;
        Ok(())
    }

    /// Accounts `len` log bytes against the call's budget; false when the
    /// message is to be dropped.
    fn log_allowed(&mut self, len: u64) -> bool {
        let budget = self.limits.log_budget;
        let before = self.log_used;
        self.log_used = before.saturating_add(len);
        if self.log_used <= budget {
            return true;
        }
        if before <= budget {
            log::warn!(
                target: "snapvm::guest",
                "guest log budget of {budget} bytes for this call is used up; \
                 its further messages are dropped"
            );
        }
        false
    }

    fn hypercall_log(&mut self) -> Result<(), VmError> {
        let [level, ptr, len] = self.read_words::<3>(ARGS)?;
        let ram = &self.machine.ram;
        check_user_range(ram.size(), ptr, len).map_err(|e| bad("Log", e))?;
        let len = len.min(self.limits.message);
        if !self.log_allowed(len) {
            return Ok(());
        }
        let level = match level {
            1 => log::Level::Error,
            2 => log::Level::Warn,
            3 => log::Level::Info,
            4 => log::Level::Debug,
            _ => log::Level::Trace,
        };
        if !log::log_enabled!(target: "snapvm::guest", level) {
            return Ok(());
        }
        let text = read_str(&self.machine.ram, ptr, len, len, true).map_err(|e| bad("Log", e))?;
        log::log!(target: "snapvm::guest", level, "{text}");
        Ok(())
    }

    /// Serves a host call. The function is looked up before any input is
    /// copied; input and result are bounded by the configured limits; the
    /// copy runs under the call's deadline, and only the host function
    /// itself runs with the timer off (so its system calls are not
    /// interrupted). A panic in the host function is caught here.
    fn hypercall_host_call(
        &mut self,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<(), VmError> {
        let [name_ptr, name_len, in_ptr, in_len, out_ptr, out_cap] = self.read_words::<6>(ARGS)?;
        let size = self.memory_size();
        let name = read_str(
            &self.machine.ram,
            name_ptr,
            name_len,
            abi::MAX_FUNCTION_NAME,
            false,
        )
        .map_err(|e| bad("HostCall", e))?;
        check_user_range(size, in_ptr, in_len).map_err(|e| bad("HostCall", e))?;
        check_user_range(size, out_ptr, out_cap).map_err(|e| bad("HostCall", e))?;
        self.pending_host_result = None;
        let Some(f) = self.host_functions.get(&name).cloned() else {
            return self.write_words(RET, &[abi::HOST_CALL_UNKNOWN, 0]);
        };
        let (status, result) = if in_len > self.limits.host_call_input {
            let message = format!(
                "host call input of {in_len} bytes exceeds the {}-byte limit",
                self.limits.host_call_input
            );
            (abi::HOST_CALL_FAILED, message.into_bytes())
        } else {
            let input = self
                .machine
                .ram
                .read_vec(in_ptr, in_len)
                .map_err(|e| bad("HostCall", e.into()))?;
            if deadline.is_some() {
                timer::disarm();
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input)));
            if let Some((at, limit)) = deadline {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(VmError::Timeout { limit });
                }
                timer::arm(left).map_err(VmError::Timer)?;
            }
            match outcome {
                Ok(Ok(out)) if out.len() as u64 > self.limits.host_call_output => {
                    let message = format!(
                        "host function result of {} bytes exceeds the {}-byte limit",
                        out.len(),
                        self.limits.host_call_output
                    );
                    (abi::HOST_CALL_FAILED, message.into_bytes())
                }
                Ok(Ok(out)) => (abi::HOST_CALL_OK, out),
                Ok(Err(e)) => (abi::HOST_CALL_FAILED, e.to_string().into_bytes()),
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    return Err(VmError::HostFunctionPanic { name, message });
                }
            }
        };
        let len = result.len() as u64;
        if len <= out_cap {
            self.machine
                .ram
                .write(out_ptr, &result)
                .map_err(|e| bad("HostCall", e.into()))?;
            self.note_host_write(out_ptr, len);
            self.write_words(RET, &[status, len])
        } else {
            // Keep the original status in the result so `HostResult` can
            // report success and failure alike.
            self.pending_host_result = Some(result);
            self.pending_status = status;
            self.write_words(RET, &[abi::HOST_CALL_TOO_SMALL, len])
        }
    }

    fn hypercall_preserve(&mut self) -> Result<(), VmError> {
        let [addr, len] = self.read_words::<2>(ARGS)?;
        let in_program_area = addr >= abi::USER_BASE
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.heap_end);
        let total = self
            .preserved
            .iter()
            .map(|&(_, l)| l)
            .fold(len, u64::saturating_add);
        let status = if !in_program_area || len == 0 {
            abi::PRESERVE_OUT_OF_RANGE
        } else if total > self.max_preserved || self.preserved.len() >= MAX_PRESERVED_REGIONS {
            abi::PRESERVE_TOO_LARGE
        } else {
            self.preserved.push((addr, len));
            abi::PRESERVE_OK
        };
        self.write_words(RET, &[status])
    }

    /// Copies guest memory at `addr` into `buf`, for inspection (debuggers,
    /// tests). The vCPU is stopped whenever the caller holds the VM.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.machine
            .ram
            .read(addr, buf)
            .map_err(|e| VmError::MemoryOutOfRange {
                addr: e.addr,
                len: e.len,
            })
    }

    /// The regions the guest asked to keep across resets.
    pub fn preserved_regions(&self) -> &[(u64, u64)] {
        &self.preserved
    }

    fn hypercall_host_result(&mut self) -> Result<(), VmError> {
        let [ptr, cap] = self.read_words::<2>(ARGS)?;
        check_user_range(self.memory_size(), ptr, cap).map_err(|e| bad("HostResult", e))?;
        let Some(result) = self.pending_host_result.take() else {
            return self.write_words(RET, &[abi::HOST_CALL_NO_RESULT, 0]);
        };
        let len = result.len() as u64;
        if len > cap {
            let status = abi::HOST_CALL_TOO_SMALL;
            self.pending_host_result = Some(result);
            return self.write_words(RET, &[status, len]);
        }
        self.machine
            .ram
            .write(ptr, &result)
            .map_err(|e| bad("HostResult", e.into()))?;
        self.note_host_write(ptr, len);
        self.write_words(RET, &[self.pending_status, len])
    }

    /// A guest message (panic, abort), truncated to the configured limit.
    fn read_message(&self, hypercall: &'static str, ptr: u64, len: u64) -> Result<String, VmError> {
        check_user_range(self.memory_size(), ptr, len).map_err(|e| bad(hypercall, e))?;
        let len = len.min(self.limits.message);
        read_str(&self.machine.ram, ptr, len, len, true).map_err(|e| bad(hypercall, e))
    }

    fn hypercall_panic(&mut self) -> VmError {
        let result = (|| {
            let [msg_ptr, msg_len, file_ptr, file_len, line, column] =
                self.read_words::<6>(ARGS)?;
            let message = self.read_message("Panic", msg_ptr, msg_len)?;
            let location = if file_len == 0 {
                None
            } else {
                check_user_range(self.memory_size(), file_ptr, file_len)
                    .map_err(|e| bad("Panic", e))?;
                let file = read_str(&self.machine.ram, file_ptr, file_len, MAX_FILE_NAME, true)
                    .map_err(|e| bad("Panic", e))?;
                Some(PanicLocation {
                    file,
                    line: line as u32,
                    column: column as u32,
                })
            };
            Ok(VmError::GuestPanic { message, location })
        })();
        result.unwrap_or_else(|e| e)
    }

    fn hypercall_abort(&mut self) -> VmError {
        let result = (|| {
            let [ptr, len] = self.read_words::<2>(ARGS)?;
            let message = self.read_message("Abort", ptr, len)?;
            Ok(VmError::GuestAbort { message })
        })();
        result.unwrap_or_else(|e| e)
    }

    /// Reads the exception frame the CPL0 stub left on its stack.
    fn read_fault(&mut self) -> VmError {
        let regs = match self.machine.vcpu.get_regs() {
            Ok(regs) => regs,
            Err(source) => {
                return VmError::Kvm {
                    step: "KVM_GET_REGS",
                    source,
                }
            }
        };
        let sregs = match self.machine.vcpu.get_sregs() {
            Ok(sregs) => sregs,
            Err(source) => {
                return VmError::Kvm {
                    step: "KVM_GET_SREGS",
                    source,
                }
            }
        };
        // Frame: vector, error code, then what the CPU pushed (RIP, CS, ...).
        let mut frame = [0u8; 24];
        if self.machine.ram.read(regs.rsp, &mut frame).is_err()
            || !(abi::SYSTEM_AREA_START..abi::SYSTEM_AREA_END).contains(&regs.rsp)
        {
            return VmError::UnexpectedExit {
                exit: format!("fault exit with stack pointer {:#x}", regs.rsp),
            };
        }
        let word =
            |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let vector = word(0) as u8;
        VmError::GuestFault(GuestFault {
            vector,
            error_code: word(1),
            rip: word(2),
            addr: (vector == 14).then_some(sregs.cr2),
        })
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

    /// The pages of the last [`Self::pending_dirty_pages`] that stay
    /// writable (hot), sorted.
    pub(crate) fn hot_pages(&self) -> &[u64] {
        self.dirty.hot()
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

    fn read_words<const N: usize>(&self, addr: u64) -> Result<[u64; N], VmError> {
        let mut bytes = [[0u8; 8]; N];
        self.machine
            .ram
            .read(addr, bytes.as_flattened_mut())
            .map_err(|e| bad("ABI page", e.into()))?;
        Ok(bytes.map(u64::from_le_bytes))
    }

    fn write_words(&self, addr: u64, words: &[u64]) -> Result<(), VmError> {
        let mut bytes = [0u8; 8 * 32];
        let len = words.len() * 8;
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        self.machine
            .ram
            .write(addr, &bytes[..len])
            .map_err(|e| bad("ABI page", e.into()))
    }
}

fn abi_boot_words(boot: &AbiPage) -> [u64; 5] {
    [
        boot.magic,
        u64::from(boot.version),
        boot.mem_size,
        boot.heap_start,
        boot.heap_end,
    ]
}

pub(crate) use layout::{page_table_pages, write_system_area_checked as write_system_area};

/// Classifies the result of one `KVM_RUN`: an I/O write gives its port,
/// value (the first four bytes) and size in bytes (element size × count),
/// an interrupted run (the timeout signal) gives `None`, and every other
/// exit is an error.
pub(crate) fn io_exit(
    run: Result<VcpuExit<'_>, kvm_ioctls::Error>,
) -> Result<Option<(u16, u32, usize)>, VmError> {
    match run {
        Ok(VcpuExit::IoOut(port, data)) => {
            let mut word = [0u8; 4];
            let n = data.len().min(4);
            word[..n].copy_from_slice(&data[..n]);
            Ok(Some((port, u32::from_le_bytes(word), data.len())))
        }
        Ok(VcpuExit::Shutdown) => Err(VmError::Shutdown),
        Ok(VcpuExit::IoIn(port, _)) => Err(VmError::UnexpectedExit {
            exit: format!("read from I/O port {port:#x}"),
        }),
        Ok(other) => Err(VmError::UnexpectedExit {
            exit: format!("{other:?}"),
        }),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
        Err(source) => Err(VmError::Kvm {
            step: "KVM_RUN",
            source,
        }),
    }
}

fn bad(hypercall: &'static str, reason: HypercallFault) -> VmError {
    VmError::BadHypercall { hypercall, reason }
}

/// Reads a guest string of `len` bytes (at most `limit`). With `lossy`,
/// invalid UTF-8 is replaced rather than rejected.
fn read_str(
    ram: &memory::GuestRam,
    ptr: u64,
    len: u64,
    limit: u64,
    lossy: bool,
) -> Result<String, HypercallFault> {
    if len > limit {
        return Err(HypercallFault::TooLong { len, limit });
    }
    check_user_range(ram.size(), ptr, len)?;
    let bytes = ram.read_vec(ptr, len)?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) if lossy => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        Err(_) => Err(HypercallFault::NotUtf8),
    }
}
