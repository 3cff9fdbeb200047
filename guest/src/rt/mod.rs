//! The guest runtime: boot, request dispatch and the host interface.

mod alloc_impl;
mod mem;
mod panic;
mod restore;

use core::cell::UnsafeCell;
use core::fmt;
use core::ptr::addr_of_mut;

extern crate alloc;
use alloc::string::String;
use alloc::vec::Vec;

use crate::abi::{self, AbiPage, FuncEntry, Hypercall};

pub use alloc_impl::heap_used;
pub use restore::{generation, on_restore, random_bytes, random_u64};

/// A function the guest exports: input bytes in, output bytes out.
pub type GuestFn = fn(&[u8]) -> Vec<u8>;

/// Input buffer capacity the guest starts with; the host asks for more when a
/// request needs it.
const INITIAL_INPUT_CAPACITY: usize = 64 * 1024;

/// A cell for the guest's global state. The guest runs one thread and takes
/// no interrupts, so there is never concurrent access.
pub(crate) struct GuestCell<T>(UnsafeCell<T>);

// SAFETY: a snapvm guest is single-threaded and runs with interrupts disabled,
// so a `GuestCell` is never accessed from two contexts at once.
unsafe impl<T> Sync for GuestCell<T> {}

impl<T> GuestCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    pub(crate) fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// The functions a guest exports, filled in by its init function.
pub struct Exports {
    funcs: Vec<(&'static str, GuestFn)>,
}

impl Exports {
    /// Exports `f` under `name`, so the host can invoke it by that name.
    ///
    /// # Panics
    /// If `name` is already exported, is empty, or is longer than
    /// [`abi::MAX_FUNCTION_NAME`] bytes — the VM then fails to start with a
    /// guest panic naming the problem.
    pub fn export(&mut self, name: &'static str, f: GuestFn) -> &mut Self {
        assert!(
            !name.is_empty() && name.len() as u64 <= abi::MAX_FUNCTION_NAME,
            "invalid function name length: {:?}",
            name
        );
        assert!(
            self.funcs.iter().all(|(n, _)| *n != name),
            "function {name:?} exported twice"
        );
        self.funcs.push((name, f));
        self
    }
}

fn page() -> *mut AbiPage {
    abi::ABI_PAGE_ADDR as *mut AbiPage
}

macro_rules! abi_read {
    ($field:ident) => {
        // SAFETY: the host maps the ABI page at ABI_PAGE_ADDR, readable and
        // writable at CPL3, for the whole life of the guest.
        unsafe { addr_of_mut!((*page()).$field).read_volatile() }
    };
}

macro_rules! abi_write {
    ($field:ident, $value:expr) => {{
        let value = $value;
        // SAFETY: as for `abi_read!`.
        unsafe { addr_of_mut!((*page()).$field).write_volatile(value) }
    }};
}

/// Reads the generation and entropy the host wrote.
pub(crate) fn abi_read_generation() -> (u64, [u64; 4]) {
    let generation = abi_read!(generation);
    let entropy = abi_read!(entropy);
    (generation, entropy)
}

/// Writes hypercall argument `i`.
fn set_arg(i: usize, value: u64) {
    // SAFETY: as for `abi_read!`; `i` indexes a fixed-size array and is
    // bounds-checked by the indexing below.
    unsafe { addr_of_mut!((*page()).args[i]).write_volatile(value) }
}

/// Reads hypercall result `i`.
fn ret(i: usize) -> u64 {
    // SAFETY: as for `set_arg`.
    unsafe { addr_of_mut!((*page()).ret[i]).read_volatile() }
}

/// Exits to the host with hypercall `nr`. The asm is a compiler memory
/// barrier: every write before it is visible to the host, and the guest
/// re-reads memory the host may have changed after it.
#[inline(always)]
fn hypercall(nr: Hypercall) {
    // SAFETY: `out` to the hypercall port only exits to the host; the TSS
    // I/O bitmap allows it at CPL3. It touches no guest memory or stack.
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            in("dx") abi::PORT_HYPERCALL,
            in("eax") nr as u32,
            options(nostack, preserves_flags)
        );
    }
}

/// Boots the guest: sets up the heap, runs `init`, reports ready and then
/// serves requests forever. Called by the `_start` that [`entry!`](crate::entry)
/// defines; not for direct use.
#[doc(hidden)]
pub fn __start(init: fn(&mut Exports)) -> ! {
    alloc_impl::init(abi_read!(heap_start), abi_read!(heap_end));
    restore::refresh();

    let mut exports = Exports { funcs: Vec::new() };
    init(&mut exports);
    let funcs = exports.funcs;
    let table: Vec<FuncEntry> = funcs
        .iter()
        .map(|(name, _)| FuncEntry {
            name_ptr: name.as_ptr() as u64,
            name_len: name.len() as u64,
        })
        .collect();

    let mut input: Vec<u8> = alloc::vec![0; INITIAL_INPUT_CAPACITY];
    abi_write!(guest_version, abi::ABI_VERSION);
    abi_write!(func_table, table.as_ptr() as u64);
    abi_write!(func_count, table.len() as u64);
    abi_write!(input_buf, input.as_ptr() as u64);
    abi_write!(input_cap, input.len() as u64);
    abi_write!(heap_used, heap_used() as u64);
    hypercall(Hypercall::Ready);

    let mut output: Vec<u8> = Vec::new();
    loop {
        if restore::refresh() {
            restore::run_hooks();
        }
        let status = match abi_read!(request) {
            abi::REQUEST_CALL => {
                // Free the previous output before running the next call.
                drop(core::mem::take(&mut output));
                let index = abi_read!(func_index) as usize;
                let len = abi_read!(input_len) as usize;
                match (funcs.get(index), input.get(..len)) {
                    (Some((_, f)), Some(bytes)) => {
                        output = f(bytes);
                        abi_write!(output_ptr, output.as_ptr() as u64);
                        abi_write!(output_len, output.len() as u64);
                        abi::STATUS_OK
                    }
                    _ => abi::STATUS_BAD_REQUEST,
                }
            }
            abi::REQUEST_GROW_INPUT => {
                let want = abi_read!(input_len) as usize;
                let grown = want
                    .checked_sub(input.len())
                    .is_none_or(|extra| input.try_reserve_exact(extra).is_ok());
                if grown && want > input.len() {
                    input.resize(want, 0);
                }
                abi_write!(input_buf, input.as_ptr() as u64);
                abi_write!(input_cap, input.len() as u64);
                if grown {
                    abi::STATUS_OK
                } else {
                    abi::STATUS_OUT_OF_MEMORY
                }
            }
            _ => abi::STATUS_BAD_REQUEST,
        };
        abi_write!(status, status);
        abi_write!(heap_used, heap_used() as u64);
        hypercall(Hypercall::Done);
    }
}

/// Severity of a guest log message; maps onto the host's `log::Level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u64)]
pub enum LogLevel {
    /// `log::Level::Error`.
    Error = 1,
    /// `log::Level::Warn`.
    Warn = 2,
    /// `log::Level::Info`.
    Info = 3,
    /// `log::Level::Debug`.
    Debug = 4,
    /// `log::Level::Trace`.
    Trace = 5,
}

/// Sends a formatted message to the host's logger. Prefer the
/// [`info!`](crate::info) family of macros.
pub fn log_message(level: LogLevel, args: fmt::Arguments<'_>) {
    let owned;
    let text = match args.as_str() {
        Some(s) => s,
        None => {
            owned = alloc::fmt::format(args);
            owned.as_str()
        }
    };
    set_arg(0, level as u64);
    set_arg(1, text.as_ptr() as u64);
    set_arg(2, text.len() as u64);
    hypercall(Hypercall::Log);
}

/// Stops the current function with an error message. The host receives
/// `VmError::GuestAbort` carrying `message`; the VM is poisoned.
pub fn abort(message: &str) -> ! {
    loop {
        set_arg(0, message.as_ptr() as u64);
        set_arg(1, message.len() as u64);
        hypercall(Hypercall::Abort);
    }
}

pub(crate) fn report_panic(message: &str, file: &str, line: u32, column: u32) -> ! {
    loop {
        set_arg(0, message.as_ptr() as u64);
        set_arg(1, message.len() as u64);
        set_arg(2, file.as_ptr() as u64);
        set_arg(3, file.len() as u64);
        set_arg(4, u64::from(line));
        set_arg(5, u64::from(column));
        hypercall(Hypercall::Panic);
    }
}

/// Calling functions the host registered (`VmConfig::host_function`).
pub mod host {
    use super::*;

    /// Why a host call failed.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum HostError {
        /// The host has no function of that name.
        Unknown,
        /// The host function returned an error with this message.
        Failed(String),
        /// The host answered with a status this runtime does not know.
        Protocol(u64),
    }

    impl fmt::Display for HostError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::Unknown => f.write_str("no such host function"),
                Self::Failed(msg) => write!(f, "host function failed: {msg}"),
                Self::Protocol(status) => write!(f, "unexpected host call status {status}"),
            }
        }
    }

    /// Result buffer capacity tried first; larger results take one more exit.
    const FIRST_TRY: usize = 4096;

    /// Calls host function `name` with `input` and returns its output.
    pub fn call(name: &str, input: &[u8]) -> Result<Vec<u8>, HostError> {
        let mut out: Vec<u8> = Vec::with_capacity(FIRST_TRY);
        set_arg(0, name.as_ptr() as u64);
        set_arg(1, name.len() as u64);
        set_arg(2, input.as_ptr() as u64);
        set_arg(3, input.len() as u64);
        set_arg(4, out.as_mut_ptr() as u64);
        set_arg(5, out.capacity() as u64);
        hypercall(Hypercall::HostCall);
        let (mut status, mut len) = (ret(0), ret(1) as usize);
        if status == abi::HOST_CALL_TOO_SMALL {
            out = Vec::with_capacity(len);
            set_arg(0, out.as_mut_ptr() as u64);
            set_arg(1, out.capacity() as u64);
            hypercall(Hypercall::HostResult);
            (status, len) = (ret(0), ret(1) as usize);
        }
        if matches!(status, abi::HOST_CALL_OK | abi::HOST_CALL_FAILED) {
            if len > out.capacity() {
                return Err(HostError::Protocol(status));
            }
            // SAFETY: the host wrote `len` bytes into `out`'s buffer and
            // `len` is within its capacity (checked above).
            unsafe { out.set_len(len) };
        }
        match status {
            abi::HOST_CALL_OK => Ok(out),
            abi::HOST_CALL_FAILED => Err(HostError::Failed(
                String::from_utf8_lossy(&out).into_owned(),
            )),
            abi::HOST_CALL_UNKNOWN => Err(HostError::Unknown),
            other => Err(HostError::Protocol(other)),
        }
    }
}
