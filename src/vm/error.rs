//! Errors of the `vm` module.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A CPU exception raised by guest code, as seen by the guest's CPL0 handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestFault {
    /// Exception vector: 0 divide error, 6 invalid opcode, 13 general
    /// protection, 14 page fault, …
    pub vector: u8,
    /// The error code the CPU pushed, or 0 for vectors without one.
    pub error_code: u64,
    /// Guest instruction pointer of the faulting instruction.
    pub rip: u64,
    /// For a page fault (vector 14), the faulting address (CR2).
    pub addr: Option<u64>,
}

impl GuestFault {
    /// Whether this is a page fault on the stack guard page: the guest
    /// overflowed its stack.
    pub fn is_stack_overflow(&self) -> bool {
        self.vector == 14
            && self.addr.is_some_and(|a| {
                (crate::abi::STACK_GUARD_ADDR..crate::abi::STACK_BOTTOM).contains(&a)
            })
    }

    /// Whether this is a page fault on the null guard page.
    pub fn is_null_dereference(&self) -> bool {
        self.vector == 14 && self.addr.is_some_and(|a| a < crate::abi::PAGE_SIZE)
    }

    /// A short name of the vector (`"#PF"`, `"#DE"`, …).
    pub fn mnemonic(&self) -> &'static str {
        const NAMES: [&str; 22] = [
            "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
            "#SS", "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
        ];
        NAMES
            .get(usize::from(self.vector))
            .copied()
            .unwrap_or("#??")
    }
}

impl fmt::Display for GuestFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (vector {}) at rip {:#x}, error code {:#x}",
            self.mnemonic(),
            self.vector,
            self.rip,
            self.error_code
        )?;
        if let Some(addr) = self.addr {
            write!(f, ", address {addr:#x}")?;
        }
        Ok(())
    }
}

/// Where in the guest's source a panic happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PanicLocation {
    /// Source file, as the guest's compiler recorded it.
    pub file: String,
    /// Line number.
    pub line: u32,
    /// Column number.
    pub column: u32,
}

impl fmt::Display for PanicLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Why a guest program image was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidGuest {
    /// The file could not be read.
    #[error("cannot read guest program {path}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a parseable 64-bit little-endian ELF file.
    #[error("not a valid ELF64 little-endian file")]
    Parse(#[source] elf::ParseError),
    /// The ELF file is for another machine than x86-64.
    #[error("ELF machine {machine} is not x86-64")]
    WrongMachine {
        /// `e_machine` from the header.
        machine: u16,
    },
    /// The ELF file is position independent (`ET_DYN`) or not an executable.
    #[error("ELF type {elf_type} is not a static, non-PIE executable (ET_EXEC); link with -static -no-pie")]
    NotStaticExecutable {
        /// `e_type` from the header.
        elf_type: u16,
    },
    /// The program asks for a dynamic loader or dynamic linking.
    #[error("the program is dynamically linked (has {segment}); link with -nostdlib -static")]
    Dynamic {
        /// `PT_INTERP` or `PT_DYNAMIC`.
        segment: &'static str,
    },
    /// A loadable segment's file range lies outside the file.
    #[error(
        "segment {index}: file range {offset:#x}+{size:#x} is outside the {file_len}-byte file"
    )]
    SegmentOutsideFile {
        /// Index in the program header table.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        size: u64,
        /// Length of the file.
        file_len: usize,
    },
    /// A segment has more file bytes than memory bytes.
    #[error("segment {index}: file size {file_size:#x} exceeds memory size {mem_size:#x}")]
    SegmentSizes {
        /// Index in the program header table.
        index: usize,
        /// `p_filesz`.
        file_size: u64,
        /// `p_memsz`.
        mem_size: u64,
    },
    /// A segment lies below the user area (overlapping the ABI page, system
    /// area or stack), or its end overflows.
    #[error("segment {index} at {vaddr:#x}+{size:#x} is outside the program area (from {min:#x})")]
    SegmentOutOfRange {
        /// Index in the program header table.
        index: usize,
        /// `p_vaddr`.
        vaddr: u64,
        /// `p_memsz`.
        size: u64,
        /// Lowest allowed address.
        min: u64,
    },
    /// The program does not fit in the configured guest memory (with a minimal heap).
    #[error("program image ends at {image_end:#x}, which does not fit in {memory_size:#x} bytes of guest memory with a heap")]
    TooLarge {
        /// One past the last byte of the image.
        image_end: u64,
        /// Configured guest memory size.
        memory_size: u64,
    },
    /// The program has no loadable segments, or too many.
    #[error("the program has {count} loadable segments (expected 1..={max})")]
    SegmentCount {
        /// Number found.
        count: usize,
        /// Most accepted.
        max: usize,
    },
    /// The entry point is not inside an executable loadable segment.
    #[error("entry point {entry:#x} is not inside an executable segment")]
    BadEntry {
        /// `e_entry`.
        entry: u64,
    },
}

/// Errors of [`VmInstance`](crate::VmInstance) and [`VmConfig`](super::VmConfig).
///
/// Errors marked *poisons* leave the instance in
/// [`VmState::Poisoned`](super::VmState::Poisoned): the guest stopped in the
/// middle of something and cannot be resumed. Every other error leaves a
/// ready instance ready. See [`VmError::poisons`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// `/dev/kvm` (or the device given to `check_kvm_device`) does not
    /// exist, cannot be opened or does not answer as KVM.
    #[error("cannot open {}: {source}. {hint}", path.display())]
    KvmUnavailable {
        /// The device path that was opened.
        path: std::path::PathBuf,
        /// The error from `open`.
        #[source]
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A KVM ioctl failed while setting up or running the VM.
    #[error("KVM call {step} failed")]
    Kvm {
        /// The ioctl or step that failed.
        step: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("cannot map {size} bytes of guest memory")]
    MapMemory {
        /// Requested size.
        size: u64,
        /// The error from `mmap`.
        #[source]
        source: std::io::Error,
    },
    /// The operating system could not provide fresh entropy.
    #[error("cannot read fresh entropy from the operating system")]
    Entropy(#[source] std::io::Error),
    /// The VM's network device (its TAP device) could not be opened.
    #[error("cannot open TAP device {tap:?} for the network device")]
    NetworkDevice {
        /// The TAP device's name.
        tap: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A polling VM's vCPU thread could not be started.
    #[error("cannot start the vCPU thread of a polling VM")]
    VcpuThread(#[source] std::io::Error),
    /// The per-thread timeout timer could not be created or armed.
    /// *Poisons* (it may fail while the guest is stopped mid-call).
    #[error("cannot set up the timeout timer")]
    Timer(#[source] std::io::Error),
    /// A configuration value is out of range.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The guest program image was rejected before any VM was created.
    #[error("invalid guest program: {0}")]
    InvalidGuest(#[from] InvalidGuest),
    /// The guest was built against another ABI version. *Poisons.*
    #[error("guest ABI version {guest} does not match host ABI version {host}")]
    AbiMismatch {
        /// Version the guest reported.
        guest: u32,
        /// [`ABI_VERSION`](crate::abi::ABI_VERSION).
        host: u32,
    },
    /// The instance is poisoned by an earlier error and cannot run guest code.
    #[error("the VM is poisoned by an earlier error ({cause}) and cannot run")]
    Poisoned {
        /// A short description of the poisoning error.
        cause: String,
    },
    /// No exported function has this name. The instance stays ready.
    #[error("the guest exports no function named {name:?}")]
    UnknownFunction {
        /// The name asked for.
        name: String,
    },
    /// The guest panicked. *Poisons.*
    #[error("guest panicked: {message}{}", location.as_ref().map(|l| format!(" at {l}")).unwrap_or_default())]
    GuestPanic {
        /// The panic message.
        message: String,
        /// Where it panicked, if the guest said.
        location: Option<PanicLocation>,
    },
    /// The guest function returned an error
    /// (`snapvm_guest::Exports::export_fallible`): a code and message of the
    /// guest's choosing. The function finished normally, so the instance
    /// stays ready; a guest *panic* is [`VmError::GuestPanic`] and poisons.
    #[error("guest function failed with code {code}: {message}")]
    GuestError {
        /// The guest's error code.
        code: u32,
        /// The guest's message (truncated to `VmConfig::max_message`).
        message: String,
    },
    /// The guest ran out of heap memory. *Poisons.*
    #[error("guest out of memory: an allocation of {requested} bytes failed with {heap_used} bytes in use")]
    GuestOutOfMemory {
        /// Size of the allocation that failed.
        requested: u64,
        /// Heap bytes in use when it failed.
        heap_used: u64,
    },
    /// The guest called `abort`. *Poisons.*
    #[error("guest aborted: {message}")]
    GuestAbort {
        /// The message passed to `abort`.
        message: String,
    },
    /// The guest raised a CPU exception. *Poisons.*
    #[error("guest fault: {0}")]
    GuestFault(GuestFault),
    /// The guest shut the vCPU down (triple fault). *Poisons.*
    #[error("guest shut down (triple fault)")]
    Shutdown,
    /// The call ran longer than the configured timeout. *Poisons.*
    #[error("guest call exceeded its {limit:?} {clock} timeout{}", if *clock == super::TimeoutClock::Wall {
        " (wall-clock time includes time the vCPU thread waited for a core on a loaded host; \
         TimeoutClock::ThreadCpu counts only the time it ran)"
    } else {
        ""
    })]
    Timeout {
        /// The configured limit.
        limit: Duration,
        /// The clock it ran on.
        clock: super::TimeoutClock,
    },
    /// Polling mode: the guest kept its vCPU spinning for `grace` past its
    /// polling window after the last call, instead of stopping with
    /// `Idle`; the host stopped it. *Poisons.*
    #[error("the guest kept spinning {grace:?} past its polling window; the host stopped it")]
    PollWindowOverrun {
        /// How long past the window the host waited.
        grace: Duration,
    },
    /// A hypercall pointed outside guest memory or was otherwise malformed. *Poisons.*
    #[error("bad hypercall {hypercall}: {reason}")]
    BadHypercall {
        /// The hypercall's name.
        hypercall: &'static str,
        /// What was wrong.
        reason: HypercallFault,
    },
    /// The guest used a hypercall number that does not exist. *Poisons.*
    #[error("unknown hypercall number {nr}")]
    UnknownHypercall {
        /// The number written to the hypercall port.
        nr: u32,
    },
    /// The guest wrote to an I/O port or caused an exit snapvm does not
    /// handle. *Poisons.*
    #[error("unexpected VM exit: {exit}")]
    UnexpectedExit {
        /// A description of the exit.
        exit: String,
    },
    /// The guest could not allocate room for the input. The instance stays ready.
    #[error("the guest has no room for a {len}-byte input")]
    InputTooLarge {
        /// Input length.
        len: usize,
    },
    /// The guest produced more output than `VmConfig::max_output` allows.
    /// The instance stays ready.
    #[error("guest output of {len} bytes exceeds the {limit}-byte limit")]
    OutputTooLarge {
        /// Output length the guest reported.
        len: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A host request named guest memory that does not exist.
    #[error("guest memory range {addr:#x}+{len:#x} is out of range")]
    MemoryOutOfRange {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The caller's buffer is smaller than the output. The instance stays ready.
    #[error("output of {needed} bytes does not fit the {capacity}-byte buffer")]
    OutputBufferTooSmall {
        /// Output length.
        needed: usize,
        /// Buffer length.
        capacity: usize,
    },
    /// The call was stopped from another thread with an
    /// [`InterruptHandle`](super::InterruptHandle). *Poisons* (the guest
    /// stopped mid-call); a reset makes the VM usable again.
    #[error("the call was cancelled")]
    Cancelled,
    /// Guest memory that is filled on demand (a VM restored straight from a
    /// store) could not be filled: a block failed verification, was
    /// missing, or did not arrive before the deadline. The source says
    /// which (for a store, a [`SnapshotError::Store`](crate::SnapshotError::Store)
    /// naming the block). *Poisons*, and stays: the VM cannot get that
    /// memory; drop it and restore a new one.
    #[error("guest page {page:#x} could not be filled: {source}")]
    MemoryUnavailable {
        /// The guest page (address / 4096) whose fill failed first.
        page: u64,
        /// Why.
        #[source]
        source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The input of a typed call (`VmInstance::call`) could not be encoded.
    /// Nothing ran; the instance stays ready.
    #[error("the input of a typed call does not encode: {reason}")]
    Encode {
        /// The encoder's message.
        reason: String,
    },
    /// The guest could not decode the input of a typed function
    /// (`snapvm_guest::Exports::export_typed`; error code
    /// [`abi::ERROR_BAD_INPUT`](crate::abi::ERROR_BAD_INPUT)): the request
    /// was wrong and the function never ran. The instance stays ready.
    #[error("the guest could not decode the input: {message}")]
    InputRejected {
        /// The guest's decoder message (truncated to `VmConfig::max_message`).
        message: String,
    },
    /// The output of a typed call (`VmInstance::call`) does not decode as
    /// the type asked for. The call finished; the instance stays ready.
    #[error("the output of a typed call does not decode: {reason}")]
    Decode {
        /// The decoder's message.
        reason: String,
    },
    /// A host function panicked while serving the guest. The panic is
    /// caught at the host-function boundary; the guest is left inside its
    /// host call, so this *poisons*.
    #[error("host function {name:?} panicked: {message}")]
    HostFunctionPanic {
        /// The host function's name.
        name: String,
        /// The panic payload, if it was a string.
        message: String,
    },
    /// Saved vCPU state (from a snapshot) that KVM's structures cannot
    /// hold. The instance stays as it was (a restore into it had already
    /// poisoned it).
    #[error("invalid vCPU state: {reason}")]
    InvalidVcpuState {
        /// What was wrong.
        reason: &'static str,
    },
    /// Saved guest state (from a snapshot) that does not fit this VM: an
    /// input buffer outside the guest's user memory, preserved regions
    /// beyond its limits, a function name listed twice.
    #[error("invalid guest state: {reason}")]
    InvalidGuestState {
        /// What was wrong.
        reason: &'static str,
    },
    /// The vCPU could not be brought out of an instruction it was stopped
    /// in the middle of (port or MMIO access) before its registers were
    /// rewound. *Poisons*; the VM cannot be reset in place.
    #[error("the vCPU is stuck in a pending {exit} and cannot be rewound")]
    VcpuStuck {
        /// The exit KVM kept reporting.
        exit: String,
    },
    /// The guest broke the transaction protocol (`tx::begin` inside a
    /// transaction, `tx::commit` without one, a function that returned
    /// with its transaction still open, …). *Poisons*: the guest's own
    /// bookkeeping is wrong.
    #[error("transaction protocol violation: {0}")]
    Transaction(TxFault),
}

/// How a guest broke the transaction protocol (see
/// [`VmError::Transaction`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TxFault {
    /// `TxBegin` while a transaction was open.
    #[error("a transaction began inside another")]
    Nested,
    /// `TxBegin` after the call's transaction had ended: one transaction
    /// per call.
    #[error("a second transaction began in one call")]
    SecondTransaction,
    /// `TxEnd` with no transaction open.
    #[error("a transaction ended that had not begun")]
    EndWithoutBegin,
    /// The function returned with its transaction still open.
    #[error("the function returned inside its transaction")]
    NotEnded,
    /// `TxEnd` with an outcome other than `TX_COMMIT` or `TX_ABORT`.
    #[error("unknown transaction outcome {0}")]
    BadOutcome(u64),
}

/// What was wrong with a hypercall.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HypercallFault {
    /// A buffer lies (partly) outside guest memory or its end overflows.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A length exceeds the limit for this argument.
    #[error("length {len} exceeds the limit of {limit}")]
    TooLong {
        /// Length given.
        len: u64,
        /// Limit.
        limit: u64,
    },
    /// A string argument is not UTF-8.
    #[error("string is not valid UTF-8")]
    NotUtf8,
    /// The hypercall is not allowed at this point of the protocol.
    #[error("not allowed now ({0})")]
    OutOfSequence(&'static str),
    /// Two exported functions share a name.
    #[error("function {0:?} exported twice")]
    DuplicateFunction(String),
    /// The guest reported a status the host does not know.
    #[error("unknown status {0}")]
    BadStatus(u64),
    /// A buffer lies in memory guest code cannot access at CPL3 (the null
    /// guard, the ABI page, the supervisor-only system area, the stack
    /// guard). The host reads and writes for the guest only where the
    /// guest itself could: the user stack and the program area up to the
    /// end of guest memory (see `docs/architecture.md`).
    #[error("buffer {addr:#x}+{len:#x} is not memory the guest can access")]
    NotGuestMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The guest answered a request to grow its input buffer with a buffer
    /// smaller than asked for.
    #[error("asked for an input buffer of {wanted} bytes, the guest offered {offered}")]
    InputBufferTooSmall {
        /// Bytes the host asked for.
        wanted: u64,
        /// Capacity the guest reported.
        offered: u64,
    },
}

impl From<crate::sys::memory::OutOfRange> for HypercallFault {
    fn from(e: crate::sys::memory::OutOfRange) -> Self {
        Self::OutOfRange {
            addr: e.addr,
            len: e.len,
        }
    }
}

impl VmError {
    /// Whether this error poisons the instance it came from.
    pub fn poisons(&self) -> bool {
        // Exhaustive on purpose: a new variant must decide here.
        match self {
            Self::AbiMismatch { .. }
            | Self::Poisoned { .. }
            | Self::GuestPanic { .. }
            | Self::GuestAbort { .. }
            | Self::GuestOutOfMemory { .. }
            | Self::GuestFault(_)
            | Self::Shutdown
            | Self::Timeout { .. }
            | Self::PollWindowOverrun { .. }
            | Self::BadHypercall { .. }
            | Self::UnknownHypercall { .. }
            | Self::UnexpectedExit { .. }
            | Self::Kvm { .. }
            | Self::Timer(_)
            | Self::HostFunctionPanic { .. }
            | Self::Cancelled
            | Self::MemoryUnavailable { .. }
            | Self::VcpuStuck { .. }
            | Self::Transaction(_) => true,
            Self::KvmUnavailable { .. }
            | Self::VcpuThread(_)
            | Self::MapMemory { .. }
            | Self::Entropy(_)
            | Self::NetworkDevice { .. }
            | Self::InvalidConfig { .. }
            | Self::InvalidGuest(_)
            | Self::UnknownFunction { .. }
            | Self::GuestError { .. }
            | Self::InputRejected { .. }
            | Self::Encode { .. }
            | Self::Decode { .. }
            | Self::InputTooLarge { .. }
            | Self::OutputTooLarge { .. }
            | Self::MemoryOutOfRange { .. }
            | Self::OutputBufferTooSmall { .. }
            | Self::InvalidVcpuState { .. }
            | Self::InvalidGuestState { .. } => false,
        }
    }

    /// What kind of failure this is (see [`ErrorKind`](crate::ErrorKind)).
    /// An exhaustive `match`: a new variant must decide.
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            Self::GuestPanic { .. }
            | Self::GuestAbort { .. }
            | Self::GuestOutOfMemory { .. }
            | Self::GuestFault(_)
            | Self::Shutdown
            | Self::BadHypercall { .. }
            | Self::UnknownHypercall { .. }
            | Self::UnexpectedExit { .. }
            | Self::VcpuStuck { .. }
            | Self::PollWindowOverrun { .. }
            | Self::Transaction(_) => K::GuestCrash,
            Self::GuestError { .. } => K::GuestError,
            Self::Timeout { .. } => K::Timeout,
            Self::Cancelled => K::Cancelled,
            Self::UnknownFunction { .. }
            | Self::InputTooLarge { .. }
            | Self::OutputTooLarge { .. }
            | Self::OutputBufferTooSmall { .. }
            | Self::MemoryOutOfRange { .. }
            | Self::Encode { .. }
            | Self::InputRejected { .. }
            | Self::Decode { .. } => K::BadRequest,
            Self::Poisoned { .. } => K::Poisoned,
            Self::InvalidConfig { .. }
            | Self::InvalidGuest(_)
            | Self::AbiMismatch { .. }
            | Self::InvalidVcpuState { .. }
            | Self::InvalidGuestState { .. } => K::Invalid,
            Self::KvmUnavailable { .. }
            | Self::Kvm { .. }
            | Self::MapMemory { .. }
            | Self::Entropy(_)
            | Self::NetworkDevice { .. }
            | Self::Timer(_)
            | Self::VcpuThread(_)
            | Self::MemoryUnavailable { .. }
            | Self::HostFunctionPanic { .. } => K::Host,
        }
    }

    /// This error itself (for code that handles [`crate::Error`],
    /// [`crate::SnapshotError`] and `VmError` alike).
    pub fn vm_error(&self) -> Option<&VmError> {
        Some(self)
    }

    pub(crate) fn kvm(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { step, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind as K;

    /// One value of every variant. The `match` in `listed` is exhaustive,
    /// so a new variant fails to compile until it is added here too.
    fn every_variant() -> Vec<VmError> {
        let io = || std::io::Error::other("x");
        let all = vec![
            VmError::KvmUnavailable {
                path: "/dev/kvm".into(),
                source: io(),
                hint: "",
            },
            VmError::Kvm {
                step: "KVM_RUN",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            },
            VmError::MapMemory {
                size: 1,
                source: io(),
            },
            VmError::Entropy(io()),
            VmError::NetworkDevice {
                tap: "tap0".into(),
                source: io(),
            },
            VmError::VcpuThread(io()),
            VmError::Timer(io()),
            VmError::InvalidConfig {
                field: "f",
                reason: String::new(),
            },
            VmError::InvalidGuest(InvalidGuest::Read {
                path: "g".into(),
                source: io(),
            }),
            VmError::AbiMismatch { guest: 2, host: 1 },
            VmError::Poisoned {
                cause: String::new(),
            },
            VmError::UnknownFunction {
                name: String::new(),
            },
            VmError::GuestPanic {
                message: String::new(),
                location: None,
            },
            VmError::GuestError {
                code: 1,
                message: String::new(),
            },
            VmError::GuestOutOfMemory {
                requested: 1,
                heap_used: 1,
            },
            VmError::GuestAbort {
                message: String::new(),
            },
            VmError::GuestFault(GuestFault {
                vector: 13,
                error_code: 0,
                rip: 0,
                addr: None,
            }),
            VmError::Shutdown,
            VmError::Timeout {
                limit: Duration::from_secs(1),
                clock: super::super::TimeoutClock::Wall,
            },
            VmError::PollWindowOverrun {
                grace: Duration::from_millis(50),
            },
            VmError::BadHypercall {
                hypercall: "Done",
                reason: HypercallFault::BadStatus(9),
            },
            VmError::UnknownHypercall { nr: 99 },
            VmError::UnexpectedExit {
                exit: String::new(),
            },
            VmError::InputTooLarge { len: 1 },
            VmError::OutputTooLarge { len: 2, limit: 1 },
            VmError::MemoryOutOfRange { addr: 0, len: 1 },
            VmError::OutputBufferTooSmall {
                needed: 2,
                capacity: 1,
            },
            VmError::Cancelled,
            VmError::MemoryUnavailable {
                page: 0,
                source: std::sync::Arc::new(io()),
            },
            VmError::Encode {
                reason: String::new(),
            },
            VmError::InputRejected {
                message: String::new(),
            },
            VmError::Decode {
                reason: String::new(),
            },
            VmError::HostFunctionPanic {
                name: String::new(),
                message: String::new(),
            },
            VmError::InvalidVcpuState { reason: "" },
            VmError::InvalidGuestState { reason: "" },
            VmError::VcpuStuck {
                exit: String::new(),
            },
            VmError::Transaction(TxFault::NotEnded),
        ];
        let mut seen = std::collections::HashSet::new();
        for e in &all {
            seen.insert(listed(e));
        }
        assert_eq!(seen.len(), all.len(), "one value per variant");
        all
    }

    fn listed(e: &VmError) -> std::mem::Discriminant<VmError> {
        match e {
            VmError::KvmUnavailable { .. }
            | VmError::Kvm { .. }
            | VmError::MapMemory { .. }
            | VmError::Entropy(_)
            | VmError::NetworkDevice { .. }
            | VmError::VcpuThread(_)
            | VmError::Timer(_)
            | VmError::InvalidConfig { .. }
            | VmError::InvalidGuest(_)
            | VmError::AbiMismatch { .. }
            | VmError::Poisoned { .. }
            | VmError::UnknownFunction { .. }
            | VmError::GuestPanic { .. }
            | VmError::GuestError { .. }
            | VmError::GuestOutOfMemory { .. }
            | VmError::GuestAbort { .. }
            | VmError::GuestFault(_)
            | VmError::Shutdown
            | VmError::Timeout { .. }
            | VmError::PollWindowOverrun { .. }
            | VmError::BadHypercall { .. }
            | VmError::UnknownHypercall { .. }
            | VmError::UnexpectedExit { .. }
            | VmError::InputTooLarge { .. }
            | VmError::OutputTooLarge { .. }
            | VmError::MemoryOutOfRange { .. }
            | VmError::OutputBufferTooSmall { .. }
            | VmError::Cancelled
            | VmError::MemoryUnavailable { .. }
            | VmError::Encode { .. }
            | VmError::InputRejected { .. }
            | VmError::Decode { .. }
            | VmError::HostFunctionPanic { .. }
            | VmError::InvalidVcpuState { .. }
            | VmError::InvalidGuestState { .. }
            | VmError::VcpuStuck { .. }
            | VmError::Transaction(_) => std::mem::discriminant(e),
        }
    }

    /// `kind()` and `poisons()` tell one story: the kinds whose docs say
    /// the VM is poisoned come from errors that poison, the kinds that say
    /// it is ready from errors that do not.
    #[test]
    fn kind_and_poisons_agree_for_every_variant() {
        for e in every_variant() {
            match e.kind() {
                K::GuestCrash | K::Timeout | K::Cancelled | K::Poisoned => {
                    assert!(e.poisons(), "{e:?} is {:?} but does not poison", e.kind())
                }
                K::GuestError | K::BadRequest => {
                    assert!(!e.poisons(), "{e:?} is {:?} but poisons", e.kind())
                }
                // Invalid input or a host failure: either, as it happened.
                _ => {}
            }
        }
    }
}
