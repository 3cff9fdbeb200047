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
    HostFn, HostFnError, ScratchDisk, VmConfig, DEFAULT_MAX_OUTPUT, DEFAULT_MAX_PRESERVED,
    DEFAULT_MEMORY_SIZE, DEFAULT_TIMEOUT, MAX_DISK_SIZE, MAX_MEMORY_SIZE, MIN_MEMORY_SIZE,
};
pub use error::{GuestFault, HypercallFault, InvalidGuest, PanicLocation, VmError};
pub use loader::GuestProgram;
pub use machine::{check_kvm, check_kvm_device};
pub use timer::timeout_signal;

use crate::abi::{self, AbiPage, Hypercall, ABI_PAGE_ADDR, PORT_FAULT, PORT_HYPERCALL};
use machine::Machine;

/// Longest log message taken from a guest; longer ones are truncated.
const MAX_LOG: u64 = 64 * 1024;
/// Longest panic or abort message taken from a guest.
const MAX_MESSAGE: u64 = 64 * 1024;
/// Longest source file name in a panic location.
const MAX_FILE_NAME: u64 = 4096;

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
    /// Guest pages the host wrote since the dirty log was last taken (the
    /// KVM log only sees guest writes).
    pub(crate) host_dirty: Vec<(u64, u64)>,
    /// The snapshot this VM's memory is tracked against, if any.
    pub(crate) base: Option<crate::snapshot::SnapshotId>,
    /// The snapshot whose image backs this VM's memory (lazy restore).
    pub(crate) backing: Option<crate::snapshot::Snapshot>,
    /// SHA-256 of the guest program this VM runs.
    pub(crate) program_digest: [u8; 32],
    /// Regions (address, length) the guest asked to keep across resets.
    pub(crate) preserved: Vec<(u64, u64)>,
    /// Pages (one bit each) the guest wrote since `base`, gathered from
    /// KVM's dirty log (which clears on every read).
    pub(crate) dirty_acc: Vec<u64>,
    /// The guest restores its own vector state around every `Ready`/`Done`
    /// (`GUEST_FLAG_RESETS_VECTOR_STATE`).
    pub(crate) guest_resets_cpu: bool,
    /// The pages of the previous `take_dirty_pages`, to find hot pages.
    dirty_prev: Vec<u64>,
    /// Indices of the non-zero words of `dirty_acc` and `dirty_prev`, so a
    /// reset's work follows the pages written, not the memory size.
    acc_words: Vec<usize>,
    prev_words: Vec<usize>,
    /// From the last `take_dirty_pages`: pages to write-protect again, and
    /// hot pages left writable.
    protect_pending: Vec<(usize, u64)>,
    hot_pending: Vec<u64>,
    /// Counts `take_dirty_pages` calls, for [`HOT_PERIOD`].
    hot_round: u64,
    /// Bits set in `dirty_acc`.
    dirty_count: u64,
    /// The dirty log was read after the vCPU last ran (reading it again
    /// would return nothing new).
    dirty_fresh: bool,
    pub(crate) max_preserved: u64,
    /// End of the program area (the heap); the scratch disk lies above.
    heap_end: u64,
}

/// Most pages kept writable between resets (see
/// [`VmInstance::take_dirty_pages`]): bounds the copy every reset does.
pub(crate) const HOT_PAGES: usize = 64;
/// Resets after which the kept-writable pages are write-protected again.
pub(crate) const HOT_PERIOD: u64 = 256;

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
            host_dirty: Vec::new(),
            base: None,
            backing: None,
            program_digest: *config.program.digest(),
            preserved: Vec::new(),
            dirty_acc: Vec::new(),
            dirty_count: 0,
            dirty_prev: Vec::new(),
            acc_words: Vec::new(),
            prev_words: Vec::new(),
            protect_pending: Vec::new(),
            hot_pending: Vec::new(),
            hot_round: 0,
            guest_resets_cpu: false,
            dirty_fresh: false,
            max_preserved: config.max_preserved,
            heap_end: config.memory_size,
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
        let result = self.call_inner(index, input);
        result.map_err(|e| self.poison(e))
    }

    fn call_inner(&mut self, index: u64, input: &[u8]) -> Result<(u64, u64), VmError> {
        self.pending_host_result = None;
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
        self.machine
            .ram
            .check(output_ptr, output_len)
            .map_err(|e| bad("Done", e.into()))?;
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
            abi::STATUS_OK => Err(bad("Done", HypercallFault::BadStatus(status))),
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
        self.machine
            .ram
            .check(buf, cap)
            .map_err(|e| bad("Ready", e.into()))?;
        self.input_buf = buf;
        self.input_cap = cap;
        Ok(())
    }

    /// Runs the vCPU until the guest reports Ready or Done, serving the
    /// hypercalls it makes on the way.
    fn run(&mut self) -> Result<Stop, VmError> {
        self.dirty_fresh = false;
        let deadline = self.timeout.map(|limit| (Instant::now() + limit, limit));
        if let Some((_, limit)) = deadline {
            timer::arm(limit).map_err(VmError::Timer)?;
        }
        let result = self.run_loop(deadline);
        if deadline.is_some() {
            timer::disarm();
        }
        result
    }

    fn run_loop(&mut self, deadline: Option<(Instant, Duration)>) -> Result<Stop, VmError> {
        loop {
            let Some((port, value)) = io_exit(self.machine.vcpu.run())? else {
                if let Some((at, limit)) = deadline {
                    if Instant::now() >= at {
                        return Err(VmError::Timeout { limit });
                    }
                }
                continue;
            };
            match port {
                PORT_HYPERCALL => match Hypercall::from_u32(value) {
                    Some(Hypercall::Ready) => return Ok(Stop::Ready),
                    Some(Hypercall::Done) => return Ok(Stop::Done),
                    Some(Hypercall::Log) => self.hypercall_log()?,
                    Some(Hypercall::HostCall) => {
                        if deadline.is_some() {
                            timer::disarm();
                        }
                        let result = self.hypercall_host_call();
                        if let Some((at, limit)) = deadline {
                            let left = at.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                return Err(VmError::Timeout { limit });
                            }
                            timer::arm(left).map_err(VmError::Timer)?;
                        }
                        result?;
                    }
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

    fn hypercall_log(&mut self) -> Result<(), VmError> {
        let [level, ptr, len] = self.read_words::<3>(ARGS)?;
        let ram = &self.machine.ram;
        ram.check(ptr, len).map_err(|e| bad("Log", e.into()))?;
        let text =
            read_str(ram, ptr, len.min(MAX_LOG), MAX_LOG, true).map_err(|e| bad("Log", e))?;
        let level = match level {
            1 => log::Level::Error,
            2 => log::Level::Warn,
            3 => log::Level::Info,
            4 => log::Level::Debug,
            _ => log::Level::Trace,
        };
        log::log!(target: "snapvm::guest", level, "{text}");
        Ok(())
    }

    fn hypercall_host_call(&mut self) -> Result<(), VmError> {
        let [name_ptr, name_len, in_ptr, in_len, out_ptr, out_cap] = self.read_words::<6>(ARGS)?;
        let ram = &self.machine.ram;
        let name = read_str(ram, name_ptr, name_len, abi::MAX_FUNCTION_NAME, false)
            .map_err(|e| bad("HostCall", e))?;
        let input = ram
            .read_vec(in_ptr, in_len)
            .map_err(|e| bad("HostCall", e.into()))?;
        ram.check(out_ptr, out_cap)
            .map_err(|e| bad("HostCall", e.into()))?;
        let (status, result) = match self.host_functions.get(&name) {
            None => (abi::HOST_CALL_UNKNOWN, Vec::new()),
            Some(f) => match f(&input) {
                Ok(out) => (abi::HOST_CALL_OK, out),
                Err(e) => (abi::HOST_CALL_FAILED, e.to_string().into_bytes()),
            },
        };
        let len = result.len() as u64;
        if len <= out_cap {
            self.machine
                .ram
                .write(out_ptr, &result)
                .map_err(|e| bad("HostCall", e.into()))?;
            self.note_host_write(out_ptr, len);
            self.pending_host_result = None;
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
        let total: u64 = self.preserved.iter().map(|(_, l)| l).sum::<u64>() + len;
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

    fn hypercall_panic(&mut self) -> VmError {
        let result = (|| {
            let [msg_ptr, msg_len, file_ptr, file_len, line, column] =
                self.read_words::<6>(ARGS)?;
            let ram = &self.machine.ram;
            let message =
                read_str(ram, msg_ptr, msg_len, MAX_MESSAGE, true).map_err(|e| bad("Panic", e))?;
            let location = if file_len == 0 {
                None
            } else {
                let file = read_str(ram, file_ptr, file_len, MAX_FILE_NAME, true)
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
            let message = read_str(&self.machine.ram, ptr, len, MAX_MESSAGE, true)
                .map_err(|e| bad("Abort", e))?;
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
        if self.dirty_acc.len() < log.len() {
            self.dirty_acc.resize(log.len(), 0);
            self.dirty_prev.resize(log.len(), 0);
        }
        let mut written = 0;
        for (i, &word) in log.iter().enumerate() {
            if word != 0 {
                let acc = &mut self.dirty_acc[i];
                if *acc == 0 {
                    self.acc_words.push(i);
                }
                let new = u64::from((word & !*acc).count_ones());
                written += new;
                self.dirty_count += new;
                *acc |= word;
            }
        }
        Ok(written)
    }

    /// Pages the guest wrote since the VM was last at its tracked snapshot
    /// (as of the last [`Self::collect_dirty`]).
    pub(crate) fn dirty_since_base(&self) -> u64 {
        self.dirty_count
    }

    /// Takes the set of pages written since the tracked snapshot (guest
    /// writes from KVM's log, host writes, and the ABI page, which every
    /// call writes), sorted and without duplicates, and starts a new set.
    ///
    /// Pages written in two successive sets (a call's stack, the ABI page,
    /// the runtime's own data) are left writable instead of being
    /// write-protected again, up to [`HOT_PAGES`]: KVM keeps reporting them
    /// dirty, so they are always rewound, and the guest's next write to
    /// them costs no fault. Every [`HOT_PERIOD`] sets they are protected
    /// again, so pages that cooled down stop being copied.
    pub(crate) fn take_dirty_pages(&mut self) -> Result<Vec<u64>, VmError> {
        self.collect_dirty()?;
        let page_size = abi::PAGE_SIZE;
        let mut pages = Vec::with_capacity(self.dirty_count as usize + 1 + self.host_dirty.len());
        pages.push(ABI_PAGE_ADDR / page_size);
        self.hot_round += 1;
        let rehot = self.hot_round % HOT_PERIOD == 0;
        self.hot_pending.clear();
        let mut hot_left = HOT_PAGES;
        // (word index, bits written) of this set, and the pages to protect.
        let mut written: Vec<(usize, u64)> = Vec::with_capacity(self.acc_words.len());
        let mut protect: Vec<(usize, u64)> = Vec::with_capacity(self.acc_words.len());
        for &i in &self.acc_words {
            let word = std::mem::take(&mut self.dirty_acc[i]);
            let mut hot = if rehot { 0 } else { word & self.dirty_prev[i] };
            while hot.count_ones() as usize > hot_left {
                hot &= hot - 1;
            }
            hot_left -= hot.count_ones() as usize;
            let mut bits = hot;
            while bits != 0 {
                self.hot_pending
                    .push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
            protect.push((i, word & !hot));
            written.push((i, word));
            let mut bits = word;
            while bits != 0 {
                pages.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        self.acc_words.clear();
        for &i in &self.prev_words {
            self.dirty_prev[i] = 0;
        }
        self.prev_words.clear();
        for &(i, word) in &written {
            self.dirty_prev[i] = word;
            self.prev_words.push(i);
        }
        self.protect_pending = protect;
        self.hot_pending.sort_unstable();
        self.dirty_count = 0;
        for (addr, len) in self.host_dirty.drain(..) {
            pages.extend(addr / page_size..=(addr + len - 1) / page_size);
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }

    /// The pages of the last [`Self::take_dirty_pages`] that are to stay
    /// writable (hot), sorted.
    pub(crate) fn hot_pages(&self) -> &[u64] {
        &self.hot_pending
    }

    /// Write-protects again every page of the last
    /// [`Self::take_dirty_pages`] except the hot ones, and also the hot pages
    /// in `demote` (found unchanged, so no longer written by calls).
    pub(crate) fn protect_dirty(&mut self, demote: &[u64]) -> Result<(), VmError> {
        let mut protect = std::mem::take(&mut self.protect_pending);
        for &page in demote {
            let i = (page / 64) as usize;
            let bit = 1u64 << (page % 64);
            self.dirty_prev[i] &= !bit;
            match protect.iter_mut().find(|(w, _)| *w == i) {
                Some((_, bits)) => *bits |= bit,
                None => protect.push((i, bit)),
            }
        }
        if let (Some(lo), Some(hi)) = (
            protect.iter().map(|&(i, _)| i).min(),
            protect.iter().map(|&(i, _)| i).max(),
        ) {
            let mut bitmap = vec![0u64; hi - lo + 1];
            for &(i, bits) in &protect {
                bitmap[i - lo] |= bits;
            }
            self.machine.clear_dirty_log(lo, &bitmap)?;
        }
        Ok(())
    }

    /// Forgets every recorded write (after memory was rewound wholesale and
    /// the dirty log cleared).
    pub(crate) fn clear_dirty(&mut self) {
        self.dirty_acc.iter_mut().for_each(|w| *w = 0);
        self.dirty_prev.iter_mut().for_each(|w| *w = 0);
        self.acc_words.clear();
        self.prev_words.clear();
        self.dirty_count = 0;
        self.host_dirty.clear();
    }

    /// Records a host write into guest memory for dirty tracking.
    pub(crate) fn note_host_write(&mut self, addr: u64, len: u64) {
        if self.dirty_tracking && len > 0 {
            self.host_dirty.push((addr, len));
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

/// Classifies the result of one `KVM_RUN`: an I/O write gives its port and
/// value, an interrupted run (the timeout signal) gives `None`, and every
/// other exit is an error.
pub(crate) fn io_exit(
    run: Result<VcpuExit<'_>, kvm_ioctls::Error>,
) -> Result<Option<(u16, u32)>, VmError> {
    match run {
        Ok(VcpuExit::IoOut(port, data)) => {
            let mut word = [0u8; 4];
            let n = data.len().min(4);
            word[..n].copy_from_slice(&data[..n]);
            Ok(Some((port, u32::from_le_bytes(word))))
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
    let bytes = ram.read_vec(ptr, len)?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) if lossy => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        Err(_) => Err(HypercallFault::NotUtf8),
    }
}
