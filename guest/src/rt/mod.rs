//! The guest runtime: boot, request dispatch and the host interface.

mod alloc_impl;
mod mem;
#[cfg(feature = "net")]
pub mod net;
mod panic;
mod restore;
pub mod trace;
pub mod tx;

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

/// A guest function that can fail: `Err` reaches the host as
/// `VmError::GuestError { code, message }`, and the VM stays ready (unlike
/// a panic, which poisons it).
pub type FallibleGuestFn = fn(&[u8]) -> Result<Vec<u8>, GuestError>;

/// An error a guest function returns to its caller: a code of the guest's
/// choosing and a message. The host receives both in
/// `VmError::GuestError`; nothing is poisoned.
///
/// ```ignore
/// fn parse(input: &[u8]) -> Result<Vec<u8>, GuestError> {
///     let text = core::str::from_utf8(input).map_err(|_| GuestError::new(400, "not UTF-8"))?;
///     Ok(text.to_uppercase().into_bytes())
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestError {
    /// A code for the host to match on (its meaning is the guest's).
    pub code: u32,
    /// A human-readable message.
    pub message: String,
}

impl GuestError {
    /// An error with `code` and `message`.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl core::fmt::Display for GuestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "error {}: {}", self.code, self.message)
    }
}

/// An exported function: infallible, fallible, or typed (a closure that
/// decodes its input and encodes its output).
enum Export {
    Plain(GuestFn),
    Fallible(FallibleGuestFn),
    #[cfg(feature = "serde")]
    Typed(TypedFn),
}

/// A typed export with its decoding and encoding around it.
#[cfg(feature = "serde")]
type TypedFn = alloc::boxed::Box<dyn Fn(&[u8]) -> Result<Vec<u8>, GuestError>>;

impl GuestError {
    /// The code of the error a typed function returns when its input does
    /// not decode (see `Exports::export_typed`).
    pub const BAD_INPUT: u32 = abi::ERROR_BAD_INPUT;
    /// The code of the error a typed function returns when its output
    /// does not encode.
    pub const BAD_OUTPUT: u32 = abi::ERROR_BAD_OUTPUT;
}

impl From<String> for GuestError {
    /// An error with code 0 and this message.
    fn from(message: String) -> Self {
        Self::new(0, message)
    }
}

impl From<&str> for GuestError {
    /// An error with code 0 and this message.
    fn from(message: &str) -> Self {
        Self::new(0, message)
    }
}

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
    funcs: Vec<(&'static str, Export)>,
}

impl Exports {
    /// Exports `f` under `name`, so the host can invoke it by that name.
    ///
    /// # Panics
    /// If `name` is already exported, is empty, or is longer than
    /// [`abi::MAX_FUNCTION_NAME`] bytes — the VM then fails to start with a
    /// guest panic naming the problem.
    pub fn export(&mut self, name: &'static str, f: GuestFn) -> &mut Self {
        self.add(name, Export::Plain(f))
    }

    /// Exports a function that can fail: its `Err` reaches the host as
    /// `VmError::GuestError { code, message }` and the VM stays ready. Use
    /// it for errors a caller should handle (bad input, a missing record);
    /// a panic is for bugs, and poisons the VM.
    ///
    /// # Panics
    /// As [`Exports::export`].
    pub fn export_fallible(&mut self, name: &'static str, f: FallibleGuestFn) -> &mut Self {
        self.add(name, Export::Fallible(f))
    }

    /// Exports a typed function (the `serde` feature): its input is decoded
    /// from, and its output encoded to, [postcard](https://docs.rs/postcard)
    /// — the host calls it with `VmInstance::call::<In, Out>`. An `Err`
    /// reaches the host as `VmError::GuestError` (code and message from
    /// `E: Into<GuestError>`); an input that does not decode as `In` is
    /// sent with code [`GuestError::BAD_INPUT`] and reaches the host as
    /// `VmError::InputRejected`, a bad request. The VM stays ready either
    /// way.
    ///
    /// ```ignore
    /// #[derive(serde::Deserialize)]
    /// struct Order { items: u32, price_cents: u64 }
    /// #[derive(serde::Serialize)]
    /// struct Total { cents: u64 }
    ///
    /// fn total(order: Order) -> Result<Total, GuestError> {
    ///     let cents = order.price_cents.checked_mul(u64::from(order.items))
    ///         .ok_or_else(|| GuestError::new(422, "total overflows"))?;
    ///     Ok(Total { cents })
    /// }
    /// // in init: exports.export_typed("total", total);
    /// ```
    ///
    /// # Panics
    /// As [`Exports::export`].
    #[cfg(feature = "serde")]
    pub fn export_typed<In, Out, E>(
        &mut self,
        name: &'static str,
        f: fn(In) -> Result<Out, E>,
    ) -> &mut Self
    where
        In: serde::de::DeserializeOwned + 'static,
        Out: serde::Serialize + 'static,
        E: Into<GuestError> + 'static,
    {
        let typed = move |bytes: &[u8]| -> Result<Vec<u8>, GuestError> {
            let input: In = postcard::from_bytes(bytes).map_err(|e| {
                GuestError::new(
                    GuestError::BAD_INPUT,
                    alloc::format!("input does not decode: {e}"),
                )
            })?;
            let output = f(input).map_err(Into::into)?;
            postcard::to_allocvec(&output).map_err(|e| {
                GuestError::new(
                    GuestError::BAD_OUTPUT,
                    alloc::format!("output does not encode: {e}"),
                )
            })
        };
        self.add(name, Export::Typed(alloc::boxed::Box::new(typed)))
    }

    fn add(&mut self, name: &'static str, f: Export) -> &mut Self {
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
pub(crate) fn set_arg(i: usize, value: u64) {
    // SAFETY: as for `abi_read!`; `i` indexes a fixed-size array and is
    // bounds-checked by the indexing below.
    unsafe { addr_of_mut!((*page()).args[i]).write_volatile(value) }
}

/// Reads hypercall result `i`.
pub(crate) fn ret(i: usize) -> u64 {
    // SAFETY: as for `set_arg`.
    unsafe { addr_of_mut!((*page()).ret[i]).read_volatile() }
}

/// Exits to the host with hypercall `nr`. The asm is a compiler memory
/// barrier: every write before it is visible to the host, and the guest
/// re-reads memory the host may have changed after it.
#[inline(always)]
pub(crate) fn hypercall(nr: Hypercall) {
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

/// The initial vector state, as an XSAVE area whose header marks every
/// component as in its initial state, and whose legacy region is the
/// initial FXSAVE image (FCW 0x37F, every x87 register empty, MXCSR
/// 0x1F80, XMM registers zero). `xrstor` from it resets x87, SSE, AVX and
/// AVX-512 state (it ignores the legacy region for components marked
/// initial); `fxrstor` from it resets x87 and SSE state.
#[repr(C, align(64))]
struct InitialXsave([u8; 576]);

static INITIAL_XSAVE: InitialXsave = InitialXsave({
    let mut area = [0u8; 576];
    let fcw = 0x37Fu16.to_le_bytes();
    area[0] = fcw[0];
    area[1] = fcw[1];
    let mxcsr = 0x1F80u32.to_le_bytes();
    area[24] = mxcsr[0];
    area[25] = mxcsr[1];
    area[26] = mxcsr[2];
    area[27] = mxcsr[3];
    area
});

/// Whether the CPU lets this guest use XSAVE (CPUID.1:ECX.OSXSAVE).
fn has_xsave() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & (1 << 27) != 0
}

/// A `Ready` or `Done` hypercall after which the guest resets its segment
/// and vector state (see [`abi::GUEST_FLAG_RESETS_VECTOR_STATE`]): when the
/// host rewinds the VM to this point it restores only the general
/// registers, and this code, running first, restores the rest. It runs
/// before the exit too, so a snapshot taken here holds the same state.
///
/// MXCSR is loaded explicitly after `xrstor` as well, so the promise (see
/// [`hypercall_stop`]) does not rest on how a CPU's `xrstor` treats MXCSR
/// when the header marks the SSE state initial.
#[inline(always)]
fn hypercall_resetting(nr: Hypercall) {
    // SAFETY: `xrstor` reads the aligned, read-only INITIAL_XSAVE area and
    // puts every enabled vector component in its initial state, and
    // `ldmxcsr` reads the valid default MXCSR at offset 24 of it (declared by
    // `clobber_abi`: the x87, XMM/YMM/ZMM and mask registers are all
    // caller-saved in the System V ABI); `out` exits to the host as in
    // `hypercall`.
    unsafe {
        core::arch::asm!(
            "xor ecx, ecx",
            "xgetbv",
            "xrstor [rdi]",
            "ldmxcsr [rdi + 24]",
            "mov eax, esi",
            "mov edx, {port}",
            "out dx, eax",
            "xor ecx, ecx",
            "xgetbv",
            "xrstor [rdi]",
            "ldmxcsr [rdi + 24]",
            port = const abi::PORT_HYPERCALL,
            in("rdi") &INITIAL_XSAVE,
            in("esi") nr as u32,
            clobber_abi("sysv64"),
            options(nostack)
        );
    }
}

/// A `Ready`, `Done`, `Idle` or `TxBegin` hypercall on a CPU that does not
/// let this guest use XSAVE: `fxrstor` puts the x87 and SSE state (MXCSR
/// included) in its initial state before and after the exit. The host
/// still restores the vector state on a reset (the guest does not set
/// [`abi::GUEST_FLAG_RESETS_VECTOR_STATE`]: AVX state, if the CPU runs it
/// anyway, is not covered).
#[inline(always)]
fn hypercall_fx_resetting(nr: Hypercall) {
    // SAFETY: `fxrstor` reads the first 512 bytes of the 64-byte aligned,
    // read-only INITIAL_XSAVE area, a valid FXSAVE image (MXCSR 0x1F80 has
    // no reserved bit set); CR4.OSFXSR is set by the host. The x87 and XMM
    // registers it overwrites are caller-saved (`clobber_abi`); `out` exits
    // to the host as in `hypercall`.
    unsafe {
        core::arch::asm!(
            "fxrstor [rdi]",
            "mov eax, esi",
            "mov edx, {port}",
            "out dx, eax",
            "fxrstor [rdi]",
            port = const abi::PORT_HYPERCALL,
            in("rdi") &INITIAL_XSAVE,
            in("esi") nr as u32,
            clobber_abi("sysv64"),
            options(nostack)
        );
    }
}

/// Whether this guest resets its vector state around `Ready`, `Done` and
/// `TxBegin` (decided once at boot, from [`has_xsave`]).
pub(crate) static RESETS: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// Issues `Ready`/`Done`/`Idle`/`TxBegin` with the vector state reset
/// around it. The promise, the same on Intel and AMD and under every
/// restore policy: each guest function starts with the x87 and SSE state
/// initial (FCW 0x37F, MXCSR 0x1F80, x87 and XMM registers clear),
/// whatever the previous call left; with `resets` (the CPU lets the guest
/// use XSAVE: every VT-x and AMD-V host) AVX and AVX-512 state too.
pub(crate) fn hypercall_stop(nr: Hypercall, resets: bool) {
    if resets {
        hypercall_resetting(nr);
    } else {
        hypercall_fx_resetting(nr);
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

    abi_write!(garbage, abi::GARBAGE_UNREPORTED);
    let mut input: Vec<u8> = alloc::vec![0; INITIAL_INPUT_CAPACITY];
    abi_write!(guest_version, abi::ABI_VERSION);
    abi_write!(func_table, table.as_ptr() as u64);
    abi_write!(func_count, table.len() as u64);
    abi_write!(input_buf, input.as_ptr() as u64);
    abi_write!(input_cap, input.len() as u64);
    abi_write!(heap_used, heap_used() as u64);
    let resets = has_xsave();
    RESETS.store(resets, core::sync::atomic::Ordering::Relaxed);
    abi_write!(
        guest_flags,
        if resets {
            abi::GUEST_FLAG_RESETS_VECTOR_STATE
        } else {
            0
        }
    );
    hypercall_stop(Hypercall::Ready, resets);

    let mut output: Vec<u8> = Vec::new();
    loop {
        if restore::refresh() {
            restore::run_hooks();
        }
        alloc_impl::take_failed_allocation();
        let request = abi_read!(request);
        if request == abi::REQUEST_IDLE {
            // The host wants the vCPU stopped (polling mode): say so and
            // stop, serving nothing.
            let _ = publish_done();
            hypercall_stop(Hypercall::Idle, resets);
            continue;
        }
        let status = match request {
            abi::REQUEST_CALL => {
                // Free the previous output before running the next call.
                drop(core::mem::take(&mut output));
                let index = abi_read!(func_index) as usize;
                let len = abi_read!(input_len) as usize;
                match (funcs.get(index), input.get(..len)) {
                    (Some((_, f)), Some(bytes)) => {
                        let result = match f {
                            Export::Plain(f) => Ok(f(bytes)),
                            Export::Fallible(f) => f(bytes),
                            #[cfg(feature = "serde")]
                            Export::Typed(f) => f(bytes),
                        };
                        let status = match result {
                            Ok(out) => {
                                output = out;
                                abi::STATUS_OK
                            }
                            Err(e) => {
                                set_arg(0, u64::from(e.code));
                                output = e.message.into_bytes();
                                abi::STATUS_GUEST_ERROR
                            }
                        };
                        abi_write!(output_ptr, output.as_ptr() as u64);
                        abi_write!(output_len, output.len() as u64);
                        status
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
        // Frames the network stack queued leave before the guest stops.
        #[cfg(feature = "net")]
        net::flush_pending();
        abi_write!(status, status);
        abi_write!(heap_used, heap_used() as u64);
        let window = abi_read!(poll_window);
        if window == 0 {
            hypercall_stop(Hypercall::Done, resets);
        } else {
            // Polling mode: spin for the next request; when the window
            // ends, stop. The host may resume this vCPU before it saw the
            // result just published: spin again then, never serve the same
            // request twice.
            let seq = publish_done();
            while !poll(seq, window) {
                hypercall_stop(Hypercall::Idle, resets);
                if fresh_request(seq) {
                    break;
                }
            }
        }
    }
}

/// Polling mode: tells the host the request it numbered last is finished,
/// and returns that number. Every other result field was written before
/// (the fence keeps the compiler from moving those writes, the CPU keeps
/// stores in order).
fn publish_done() -> u64 {
    let seq = abi_read!(poll_seq);
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
    abi_write!(poll_done, seq);
    seq
}

/// Whether the host posted a request after request `seq`, or turned
/// polling off (it wrote a request to be answered with `Done`).
fn fresh_request(seq: u64) -> bool {
    abi_read!(poll_seq) != seq || abi_read!(poll_window) == 0
}

/// Reads the time-stamp counter.
#[inline(always)]
fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` only reads the time-stamp counter into edx:eax; it
    // runs at CPL3 (the host leaves CR4.TSD clear) and touches no memory.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Polling mode, after request `seq` was answered: spins for up to
/// `window` time-stamp-counter ticks waiting for the host's next request.
/// True when one arrived (serve it without an exit), false when the window
/// ended (stop with `Idle`).
fn poll(seq: u64, window: u64) -> bool {
    let start = rdtsc();
    loop {
        if fresh_request(seq) {
            return true;
        }
        if rdtsc().wrapping_sub(start) > window {
            return false;
        }
        core::hint::spin_loop();
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

/// Whether the host takes messages at `level` (see
/// [`AbiPage::log_level`]): the log macros check it before formatting, so
/// a filtered-out message costs neither formatting nor a VM exit.
pub fn log_enabled(level: LogLevel) -> bool {
    let setting = abi_read!(log_level);
    setting & abi::LOG_LEVEL_SET == 0 || level as u64 <= setting & 0xFF
}

/// Sends a formatted message to the host's logger (if it takes `level`).
/// Prefer the [`info!`](crate::info) family of macros.
pub fn log_message(level: LogLevel, args: fmt::Arguments<'_>) {
    if !log_enabled(level) {
        return;
    }
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

pub(crate) fn report_out_of_memory(requested: usize) -> ! {
    // The host reports the heap as it is now, not as the last call left it.
    abi_write!(heap_used, heap_used() as u64);
    loop {
        set_arg(0, requested as u64);
        hypercall(Hypercall::OutOfMemory);
    }
}

/// Why [`preserve`] refused a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreserveError {
    /// The region is not inside the program's memory (image and heap).
    OutOfRange,
    /// The VM's limit on preserved bytes or regions would be exceeded.
    TooLarge,
    /// The host answered with an unknown status.
    Protocol(u64),
}

/// Asks the host to carry `value`'s bytes across resets: when the host
/// resets this VM to its ready state, everything returns to that state
/// except preserved regions, which keep their current contents. Typical
/// use: a request counter or a warm cache in a `static`.
pub fn preserve<T: ?Sized>(value: &'static T) -> Result<(), PreserveError> {
    preserve_region(
        (value as *const T).cast::<u8>() as u64,
        core::mem::size_of_val(value) as u64,
    )
}

/// Like [`preserve`], for a raw address range.
pub fn preserve_region(addr: u64, len: u64) -> Result<(), PreserveError> {
    set_arg(0, addr);
    set_arg(1, len);
    hypercall(Hypercall::Preserve);
    match ret(0) {
        abi::PRESERVE_OK => Ok(()),
        abi::PRESERVE_OUT_OF_RANGE => Err(PreserveError::OutOfRange),
        abi::PRESERVE_TOO_LARGE => Err(PreserveError::TooLarge),
        other => Err(PreserveError::Protocol(other)),
    }
}

/// Reports the guest's own measure of garbage (bytes that a collector could
/// free), for restore policies such as `GuestGarbageAbove`. Without a
/// report, the host uses the heap growth since the ready state.
pub fn report_garbage(bytes: u64) {
    abi_write!(garbage, bytes.min(abi::GARBAGE_UNREPORTED - 1));
}

/// The scratch disk the host attached (`VmConfig::scratch_disk`): a byte
/// array backed by an image file. Writes stay in this VM and never reach
/// the image; a reset returns the disk to its ready-state contents.
pub mod disk {
    use super::*;

    /// Size of a disk block.
    pub const BLOCK_SIZE: usize = 4096;

    /// Why a disk access failed.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum DiskError {
        /// No scratch disk is attached.
        NoDisk,
        /// The access runs past the end of the disk.
        OutOfRange,
    }

    fn region() -> Result<(u64, u64), DiskError> {
        let (addr, size) = (abi_read!(disk_addr), abi_read!(disk_size));
        if addr == 0 {
            Err(DiskError::NoDisk)
        } else {
            Ok((addr, size))
        }
    }

    fn range(offset: u64, len: usize) -> Result<u64, DiskError> {
        let (addr, size) = region()?;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(addr + offset),
            _ => Err(DiskError::OutOfRange),
        }
    }

    /// Disk size in bytes (0 without a disk).
    pub fn size() -> u64 {
        region().map_or(0, |(_, size)| size)
    }

    /// Reads `buf.len()` bytes at byte `offset`.
    pub fn read(offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let src = range(offset, buf.len())?;
        // SAFETY: the host maps the disk at `disk_addr` for `disk_size`
        // bytes, readable and writable at CPL3; the range is checked above.
        unsafe { core::ptr::copy_nonoverlapping(src as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Writes `data` at byte `offset`.
    pub fn write(offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let dest = range(offset, data.len())?;
        // SAFETY: as for `read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), dest as *mut u8, data.len()) };
        Ok(())
    }

    /// Reads block `index` (of [`BLOCK_SIZE`] bytes).
    pub fn read_block(index: u64, buf: &mut [u8; BLOCK_SIZE]) -> Result<(), DiskError> {
        read(
            index
                .checked_mul(BLOCK_SIZE as u64)
                .ok_or(DiskError::OutOfRange)?,
            buf,
        )
    }

    /// Writes block `index` (of [`BLOCK_SIZE`] bytes).
    pub fn write_block(index: u64, data: &[u8; BLOCK_SIZE]) -> Result<(), DiskError> {
        write(
            index
                .checked_mul(BLOCK_SIZE as u64)
                .ok_or(DiskError::OutOfRange)?,
            data,
        )
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
    #[non_exhaustive]
    pub enum HostError {
        /// The host has no function of that name.
        Unknown,
        /// The host function returned an error with this message.
        Failed(String),
        /// The host answered with a status this runtime does not know.
        Protocol(u64),
        /// A typed call's input did not encode, or its result did not
        /// decode as the type asked for (`call_typed`).
        Codec(String),
    }

    impl fmt::Display for HostError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::Unknown => f.write_str("no such host function"),
                Self::Failed(msg) => write!(f, "host function failed: {msg}"),
                Self::Protocol(status) => write!(f, "unexpected host call status {status}"),
                Self::Codec(msg) => write!(f, "typed host call: {msg}"),
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

    /// Calls a typed host function (registered on the host with
    /// `VmConfig::typed_host_function`): `input` and the result travel
    /// encoded with postcard, as in typed guest functions.
    #[cfg(feature = "serde")]
    pub fn call_typed<In, Out>(name: &str, input: &In) -> Result<Out, HostError>
    where
        In: serde::Serialize + ?Sized,
        Out: serde::de::DeserializeOwned,
    {
        let bytes = postcard::to_allocvec(input)
            .map_err(|e| HostError::Codec(alloc::format!("input does not encode: {e}")))?;
        let out = call(name, &bytes)?;
        postcard::from_bytes(&out)
            .map_err(|e| HostError::Codec(alloc::format!("result does not decode: {e}")))
    }
}
