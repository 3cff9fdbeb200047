//! The C interface: what `include/snapvm_guest.h` declares.
//!
//! A guest written in C (or in any language that can call C functions and
//! link a static library) links this runtime as a static library,
//! `libsnapvm_guest_c.a` (built from `guests/cguest` in the snapvm
//! repository: this crate plus a `_start` that calls `capi::start`). The entry
//! point sets up the heap, calls the guest's `void snapvm_init(void)`,
//! reports ready and serves the host's calls, exactly as
//! `entry!` does for a Rust guest. During `snapvm_init` the
//! guest registers its functions with `snapvm_export`.
//!
//! Conventions of the interface:
//! - Names (of exports and host functions) are NUL-terminated UTF-8 strings;
//!   byte data and messages are a pointer and a length (the pointer may be
//!   null when the length is 0).
//! - Functions that can fail return an `int32_t` status: [`SNAPVM_OK`] or one
//!   of the `SNAPVM_ERR_*` codes below. Misuse that a C compiler cannot catch
//!   (an invalid export name, output outside an exported function) panics,
//!   so the host sees a `GuestPanic` naming the problem.
//!
//! The status and level constants are compiled without features, so the host
//! side (and its tests) can check them against the header; the functions
//! need the `runtime` feature. They are ordinary `#[no_mangle]` functions:
//! a Rust guest that does not call them does not carry them (the linker
//! drops unreferenced code).
//!
//! How an exported C function is called: the runtime's function table holds
//! one Rust trampoline per C export, in registration order. The trampoline
//! reads the index of the requested function from the ABI page (the host
//! wrote it there for this call), calls the C function at that index and
//! returns the bytes the C function appended with `snapvm_output`.

/// Success.
pub const SNAPVM_OK: i32 = 0;
/// The result does not fit the buffer; the length written is the size
/// needed. For a host call, fetch the result with `snapvm_host_result`.
pub const SNAPVM_ERR_TOO_SMALL: i32 = 1;
/// The host has no function of that name.
pub const SNAPVM_ERR_UNKNOWN: i32 = 2;
/// The host function failed; the result is its error message.
pub const SNAPVM_ERR_FAILED: i32 = 3;
/// `snapvm_host_result` was called with no result pending.
pub const SNAPVM_ERR_NO_RESULT: i32 = 4;
/// The region or access is out of range (preserve, disk).
pub const SNAPVM_ERR_OUT_OF_RANGE: i32 = 5;
/// The VM's limit on preserved bytes or regions would be exceeded.
pub const SNAPVM_ERR_TOO_LARGE: i32 = 6;
/// No scratch disk is attached.
pub const SNAPVM_ERR_NO_DISK: i32 = 7;
/// An argument is invalid (a null name, a name that is not UTF-8).
pub const SNAPVM_ERR_INVALID: i32 = 8;
/// The host answered with a status this runtime does not know.
pub const SNAPVM_ERR_PROTOCOL: i32 = 9;
/// The guest heap has no room for the result.
pub const SNAPVM_ERR_NO_MEMORY: i32 = 10;

/// Log level: error.
pub const SNAPVM_LOG_ERROR: i32 = 1;
/// Log level: warning.
pub const SNAPVM_LOG_WARN: i32 = 2;
/// Log level: information.
pub const SNAPVM_LOG_INFO: i32 = 3;
/// Log level: debugging.
pub const SNAPVM_LOG_DEBUG: i32 = 4;
/// Log level: tracing.
pub const SNAPVM_LOG_TRACE: i32 = 5;

/// Alignment of every block `snapvm_alloc` returns (as C's `max_align_t`).
pub const SNAPVM_ALLOC_ALIGN: usize = 16;

/// Every constant the header defines, by name: the header must define
/// exactly these values (a test of the host crate checks it).
pub const HEADER_CONSTANTS: &[(&str, i64)] = &[
    ("SNAPVM_OK", SNAPVM_OK as i64),
    ("SNAPVM_ERR_TOO_SMALL", SNAPVM_ERR_TOO_SMALL as i64),
    ("SNAPVM_ERR_UNKNOWN", SNAPVM_ERR_UNKNOWN as i64),
    ("SNAPVM_ERR_FAILED", SNAPVM_ERR_FAILED as i64),
    ("SNAPVM_ERR_NO_RESULT", SNAPVM_ERR_NO_RESULT as i64),
    ("SNAPVM_ERR_OUT_OF_RANGE", SNAPVM_ERR_OUT_OF_RANGE as i64),
    ("SNAPVM_ERR_TOO_LARGE", SNAPVM_ERR_TOO_LARGE as i64),
    ("SNAPVM_ERR_NO_DISK", SNAPVM_ERR_NO_DISK as i64),
    ("SNAPVM_ERR_INVALID", SNAPVM_ERR_INVALID as i64),
    ("SNAPVM_ERR_PROTOCOL", SNAPVM_ERR_PROTOCOL as i64),
    ("SNAPVM_ERR_NO_MEMORY", SNAPVM_ERR_NO_MEMORY as i64),
    ("SNAPVM_LOG_ERROR", SNAPVM_LOG_ERROR as i64),
    ("SNAPVM_LOG_WARN", SNAPVM_LOG_WARN as i64),
    ("SNAPVM_LOG_INFO", SNAPVM_LOG_INFO as i64),
    ("SNAPVM_LOG_DEBUG", SNAPVM_LOG_DEBUG as i64),
    ("SNAPVM_LOG_TRACE", SNAPVM_LOG_TRACE as i64),
    ("SNAPVM_ALLOC_ALIGN", SNAPVM_ALLOC_ALIGN as i64),
    ("SNAPVM_MAX_NAME", crate::abi::MAX_FUNCTION_NAME as i64),
];

/// Every function the header declares and this module defines.
pub const HEADER_FUNCTIONS: &[&str] = &[
    "snapvm_export",
    "snapvm_output",
    "snapvm_output_reserve",
    "snapvm_host_call",
    "snapvm_host_result",
    "snapvm_host_call_alloc",
    "snapvm_log",
    "snapvm_abort",
    "snapvm_panic",
    "snapvm_preserve",
    "snapvm_random_bytes",
    "snapvm_random_u64",
    "snapvm_generation",
    "snapvm_on_restore",
    "snapvm_alloc",
    "snapvm_calloc",
    "snapvm_realloc",
    "snapvm_free",
    "snapvm_heap_used",
    "snapvm_report_garbage",
    "snapvm_disk_size",
    "snapvm_disk_read",
    "snapvm_disk_write",
];

#[cfg(feature = "runtime")]
pub use functions::*;

#[cfg(feature = "runtime")]
mod functions {
    use super::*;

    extern crate alloc;
    use alloc::alloc::Layout;
    use alloc::borrow::Cow;
    use alloc::boxed::Box;
    use alloc::string::String;
    use alloc::vec::Vec;
    use core::ffi::{c_char, c_void, CStr};
    use core::ptr::{self, addr_of};

    use crate::abi::{self, AbiPage, Hypercall};
    use crate::rt::{self, GuestCell};
    use crate::{Exports, LogLevel, PreserveError};

    /// An exported C function: `void f(const uint8_t *input, size_t len)`.
    /// It appends its output with [`snapvm_output`]; `input` is valid for
    /// the duration of the call only.
    pub type SnapvmFn = unsafe extern "C" fn(input: *const u8, len: usize);

    /// A restore hook: `void hook(void)`.
    pub type SnapvmHook = unsafe extern "C" fn();

    /// C exports in registration order (index = function index).
    static EXPORTS: GuestCell<Vec<(&'static str, SnapvmFn)>> = GuestCell::new(Vec::new());
    /// Set when the C init function returned: the function table is fixed.
    static INIT_DONE: GuestCell<bool> = GuestCell::new(false);
    /// The C init function [`start`] was given.
    static C_INIT: GuestCell<Option<SnapvmHook>> = GuestCell::new(None);
    /// The output of the running C export (`None` outside one).
    static OUTPUT: GuestCell<Option<Vec<u8>>> = GuestCell::new(None);
    /// C restore hooks in registration order.
    static HOOKS: GuestCell<Vec<SnapvmHook>> = GuestCell::new(Vec::new());

    /// Boots a guest whose init function is the C function `init` (in the
    /// header: `void snapvm_init(void)`): sets up the heap, runs `init`
    /// (which exports functions with [`snapvm_export`]), reports ready and
    /// serves the host's requests. Never returns.
    ///
    /// The static library for C guests defines the program entry point as
    /// `_start() { start(snapvm_init) }`; only such glue calls this.
    pub fn start(init: SnapvmHook) -> ! {
        // SAFETY: single-threaded guest (see `GuestCell`); nothing else
        // references the cell.
        unsafe { *C_INIT.get() = Some(init) };
        rt::__start(c_init)
    }

    fn c_init(exports: &mut Exports) {
        // SAFETY: single-threaded guest; set by `start` before `__start`.
        let init = unsafe { *C_INIT.get() }.expect("set by start");
        // SAFETY: `init` is the C program's `void snapvm_init(void)`; it
        // runs once, on the guest's only thread, before any request.
        unsafe { init() };
        // SAFETY: single-threaded guest (see `GuestCell`); no other
        // reference to these cells is live.
        let funcs = unsafe {
            *INIT_DONE.get() = true;
            &*EXPORTS.get()
        };
        for (name, _) in funcs {
            exports.export(name, call_export);
        }
    }

    /// The trampoline behind every C export.
    fn call_export(input: &[u8]) -> Vec<u8> {
        let page = abi::ABI_PAGE_ADDR as *const AbiPage;
        // SAFETY: the host maps the ABI page at ABI_PAGE_ADDR, readable at
        // CPL3, for the whole life of the guest; `func_index` holds the index
        // of the function this call is for (the runtime read it to pick this
        // trampoline and nothing changed it since).
        let index = unsafe { addr_of!((*page).func_index).read_volatile() } as usize;
        // SAFETY: single-threaded guest; the list is fixed after init.
        let f = match unsafe { (&*EXPORTS.get()).get(index) } {
            Some(&(_, f)) => f,
            None => panic!("no C export at index {index}"),
        };
        // SAFETY: single-threaded guest; no reference to OUTPUT is live.
        unsafe { *OUTPUT.get() = Some(Vec::new()) };
        // SAFETY: `f` is a C function registered with the `SnapvmFn`
        // signature; `input` is valid for `len` bytes during the call.
        unsafe { f(input.as_ptr(), input.len()) };
        // SAFETY: as above.
        unsafe { (*OUTPUT.get()).take() }.unwrap_or_default()
    }

    /// `len` bytes at `data`; a null pointer is allowed for 0 bytes.
    ///
    /// # Safety
    /// `data` must be null with `len == 0`, or valid for `len` byte reads
    /// for `'a`.
    unsafe fn bytes<'a>(data: *const u8, len: usize) -> &'a [u8] {
        if len == 0 {
            return &[];
        }
        assert!(!data.is_null(), "null pointer with a length of {len}");
        // SAFETY: non-null and, by the caller's contract, valid for `len`.
        unsafe { core::slice::from_raw_parts(data, len) }
    }

    /// `len` writable bytes at `data`, as [`bytes`].
    ///
    /// # Safety
    /// `data` must be null with `len == 0`, or valid for `len` byte writes
    /// for `'a`, and not aliased.
    unsafe fn bytes_mut<'a>(data: *mut u8, len: usize) -> &'a mut [u8] {
        if len == 0 {
            return &mut [];
        }
        assert!(!data.is_null(), "null pointer with a length of {len}");
        // SAFETY: non-null and, by the caller's contract, valid and unique.
        unsafe { core::slice::from_raw_parts_mut(data, len) }
    }

    /// The bytes of a NUL-terminated string, or `None` for a null pointer.
    ///
    /// # Safety
    /// `s` must be null or point to a NUL-terminated string valid for `'a`.
    unsafe fn c_str<'a>(s: *const c_char) -> Option<&'a [u8]> {
        if s.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated by the caller's contract.
        Some(unsafe { CStr::from_ptr(s) }.to_bytes())
    }

    fn text(bytes: &[u8]) -> Cow<'_, str> {
        String::from_utf8_lossy(bytes)
    }

    fn set_len(out_len: *mut usize, len: usize) {
        if !out_len.is_null() {
            // SAFETY: a non-null `out_len` points to a writable `size_t`
            // (the contract of every function taking one).
            unsafe { out_len.write(len) };
        }
    }

    /// Exports `f` under the NUL-terminated UTF-8 `name`. Call it only from
    /// `snapvm_init`. Panics (the VM fails to boot with a `GuestPanic`) when
    /// called later, when `name` or `f` is null, when `name` is not UTF-8,
    /// is empty or longer than 256 bytes, or is exported twice.
    ///
    /// # Safety
    /// `name` must be null or a NUL-terminated string; `f` must be a
    /// function of the [`SnapvmFn`] signature.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_export(name: *const c_char, f: Option<SnapvmFn>) {
        // SAFETY: single-threaded guest (see `GuestCell`).
        let init_done = unsafe { *INIT_DONE.get() };
        assert!(
            !init_done,
            "snapvm_export called after snapvm_init returned"
        );
        // SAFETY: forwarded from the caller.
        let Some(name) = (unsafe { c_str(name) }) else {
            panic!("snapvm_export: the name is null");
        };
        let Ok(name) = core::str::from_utf8(name) else {
            panic!("snapvm_export: the name {:?} is not UTF-8", text(name));
        };
        let Some(f) = f else {
            panic!("snapvm_export: the function for {name:?} is null");
        };
        // SAFETY: single-threaded guest; no other reference to the list.
        let exports = unsafe { &mut *EXPORTS.get() };
        assert!(
            exports.iter().all(|(n, _)| *n != name),
            "function {name:?} exported twice"
        );
        // The runtime's table keeps names for the life of the guest.
        let name: &'static str = Box::leak(String::from(name).into_boxed_str());
        exports.push((name, f));
    }

    /// Output being built by the running export, or a panic outside one.
    fn output(what: &str) -> &'static mut Vec<u8> {
        // SAFETY: single-threaded guest; callers use the reference only
        // within one C API call, so no two are live at once.
        match unsafe { &mut *OUTPUT.get() } {
            Some(out) => out,
            None => panic!("{what} called outside an exported function"),
        }
    }

    /// Appends `len` bytes at `data` to the running export's output.
    /// `data` may point into the output itself (bytes from
    /// [`snapvm_output_reserve`]): they are copied before the output grows.
    /// Panics outside an exported function.
    ///
    /// # Safety
    /// `data` must be null with `len == 0`, or valid for `len` byte reads.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_output(data: *const c_void, len: usize) {
        let out = output("snapvm_output");
        let (base, addr) = (out.as_ptr() as usize, data as usize);
        if len != 0 && addr >= base && addr - base < out.capacity() {
            // Growing the output could move the bytes being copied.
            let from = addr - base;
            let to = from.checked_add(len).filter(|&to| to <= out.len());
            let Some(to) = to else {
                panic!("snapvm_output: the source runs past the output's bytes");
            };
            out.extend_from_within(from..to);
            return;
        }
        // SAFETY: forwarded from the caller; the bytes are not the
        // output's own (checked above), so growing it does not move them.
        let data = unsafe { bytes(data.cast(), len) };
        out.extend_from_slice(data);
    }

    /// Appends `len` zero bytes to the running export's output and returns
    /// a pointer to them, for the export to fill in place. The pointer is
    /// valid until the next `snapvm_output*` call or the export's return.
    /// Panics outside an exported function.
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_output_reserve(len: usize) -> *mut u8 {
        let out = output("snapvm_output_reserve");
        let start = out.len();
        out.resize(start + len, 0);
        // SAFETY: `start <= out.len()`, so the pointer stays in bounds.
        unsafe { out.as_mut_ptr().add(start) }
    }

    fn host_status(status: u64) -> i32 {
        match status {
            abi::HOST_CALL_OK => SNAPVM_OK,
            abi::HOST_CALL_TOO_SMALL => SNAPVM_ERR_TOO_SMALL,
            abi::HOST_CALL_UNKNOWN => SNAPVM_ERR_UNKNOWN,
            abi::HOST_CALL_FAILED => SNAPVM_ERR_FAILED,
            abi::HOST_CALL_NO_RESULT => SNAPVM_ERR_NO_RESULT,
            _ => SNAPVM_ERR_PROTOCOL,
        }
    }

    /// Calls the host function `name` (registered with
    /// `VmConfig::host_function`) with `input_len` bytes at `input`; the
    /// result goes to `out` (capacity `out_cap`) and its length to
    /// `*out_len`. Returns [`SNAPVM_OK`], [`SNAPVM_ERR_FAILED`] (the result
    /// is the host's error message), [`SNAPVM_ERR_UNKNOWN`],
    /// [`SNAPVM_ERR_TOO_SMALL`] (`*out_len` is the size needed: fetch the
    /// result with [`snapvm_host_result`] before the next host call),
    /// [`SNAPVM_ERR_INVALID`] (null name) or [`SNAPVM_ERR_PROTOCOL`].
    /// One VM exit.
    ///
    /// # Safety
    /// `name` must be null or NUL-terminated; `input` valid for
    /// `input_len` byte reads and `out` for `out_cap` byte writes (either
    /// may be null with a length of 0); `out_len` null or writable.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_host_call(
        name: *const c_char,
        input: *const c_void,
        input_len: usize,
        out: *mut c_void,
        out_cap: usize,
        out_len: *mut usize,
    ) -> i32 {
        set_len(out_len, 0);
        // SAFETY: forwarded from the caller.
        let Some(name) = (unsafe { c_str(name) }) else {
            return SNAPVM_ERR_INVALID;
        };
        // SAFETY: forwarded from the caller; the slices only check the
        // pointers (the host reads and writes the memory itself).
        let (input, out) = unsafe {
            (
                bytes(input.cast(), input_len),
                bytes_mut(out.cast(), out_cap),
            )
        };
        rt::set_arg(0, name.as_ptr() as u64);
        rt::set_arg(1, name.len() as u64);
        rt::set_arg(2, input.as_ptr() as u64);
        rt::set_arg(3, input.len() as u64);
        rt::set_arg(4, out.as_mut_ptr() as u64);
        rt::set_arg(5, out.len() as u64);
        rt::hypercall(Hypercall::HostCall);
        set_len(out_len, rt::ret(1) as usize);
        host_status(rt::ret(0))
    }

    /// Fetches the result of the last host call that returned
    /// [`SNAPVM_ERR_TOO_SMALL`] into `out` (capacity `out_cap`), its length
    /// to `*out_len`. Returns the host function's status ([`SNAPVM_OK`] or
    /// [`SNAPVM_ERR_FAILED`]), [`SNAPVM_ERR_TOO_SMALL`] again if `out_cap`
    /// is still too small, or [`SNAPVM_ERR_NO_RESULT`].
    ///
    /// # Safety
    /// `out` must be valid for `out_cap` byte writes (or null with 0);
    /// `out_len` null or writable.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_host_result(
        out: *mut c_void,
        out_cap: usize,
        out_len: *mut usize,
    ) -> i32 {
        // SAFETY: forwarded from the caller.
        let out = unsafe { bytes_mut(out.cast(), out_cap) };
        rt::set_arg(0, out.as_mut_ptr() as u64);
        rt::set_arg(1, out.len() as u64);
        rt::hypercall(Hypercall::HostResult);
        set_len(out_len, rt::ret(1) as usize);
        host_status(rt::ret(0))
    }

    /// Like [`snapvm_host_call`], but the result of any size goes to a new
    /// block from [`snapvm_alloc`] stored in `*out` (free it with
    /// [`snapvm_free`]); `*out` is null when there is no result. Returns
    /// [`SNAPVM_OK`], [`SNAPVM_ERR_FAILED`] (the result is the message),
    /// [`SNAPVM_ERR_UNKNOWN`], [`SNAPVM_ERR_INVALID`],
    /// [`SNAPVM_ERR_NO_MEMORY`] or [`SNAPVM_ERR_PROTOCOL`]. One VM exit for
    /// results up to 4 KiB, two above.
    ///
    /// # Safety
    /// As [`snapvm_host_call`]; `out` must be a writable `uint8_t *`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_host_call_alloc(
        name: *const c_char,
        input: *const c_void,
        input_len: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> i32 {
        set_len(out_len, 0);
        if out.is_null() {
            return SNAPVM_ERR_INVALID;
        }
        // SAFETY: `out` is non-null and writable (caller's contract).
        unsafe { out.write(ptr::null_mut()) };
        // SAFETY: forwarded from the caller.
        let Some(name) = (unsafe { c_str(name) }) else {
            return SNAPVM_ERR_INVALID;
        };
        let Ok(name) = core::str::from_utf8(name) else {
            return SNAPVM_ERR_INVALID;
        };
        // SAFETY: forwarded from the caller.
        let input = unsafe { bytes(input.cast(), input_len) };
        let (status, result) = match rt::host::call(name, input) {
            Ok(result) => (SNAPVM_OK, result),
            Err(rt::host::HostError::Failed(message)) => (SNAPVM_ERR_FAILED, message.into_bytes()),
            Err(rt::host::HostError::Unknown) => return SNAPVM_ERR_UNKNOWN,
            // `call` itself never decodes; any other kind is a protocol error.
            Err(_) => return SNAPVM_ERR_PROTOCOL,
        };
        let block = snapvm_alloc(result.len()).cast::<u8>();
        if block.is_null() {
            return SNAPVM_ERR_NO_MEMORY;
        }
        // SAFETY: `block` holds at least `result.len()` bytes and is a new
        // allocation, so the ranges do not overlap; `out` is writable.
        unsafe {
            ptr::copy_nonoverlapping(result.as_ptr(), block, result.len());
            out.write(block);
        }
        set_len(out_len, result.len());
        status
    }

    fn log_level(level: i32) -> LogLevel {
        match level {
            i32::MIN..=SNAPVM_LOG_ERROR => LogLevel::Error,
            SNAPVM_LOG_WARN => LogLevel::Warn,
            SNAPVM_LOG_INFO => LogLevel::Info,
            SNAPVM_LOG_DEBUG => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }

    /// Sends `len` bytes at `message` to the host's logger at `level` (one
    /// of the `SNAPVM_LOG_*` values; lower values count as error, higher as
    /// trace). Invalid UTF-8 is replaced. One VM exit.
    ///
    /// # Safety
    /// `message` must be valid for `len` byte reads (or null with 0).
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_log(level: i32, message: *const c_char, len: usize) {
        // SAFETY: forwarded from the caller.
        let message = text(unsafe { bytes(message.cast(), len) });
        crate::log_message(log_level(level), format_args!("{message}"));
    }

    /// Stops the guest with `message`: the host receives
    /// `VmError::GuestAbort` and the VM is poisoned. Never returns.
    ///
    /// # Safety
    /// `message` must be valid for `len` byte reads (or null with 0).
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_abort(message: *const c_char, len: usize) -> ! {
        // SAFETY: forwarded from the caller.
        let message = text(unsafe { bytes(message.cast(), len) });
        crate::abort(&message)
    }

    /// Stops the guest as a panic at `file:line`: the host receives
    /// `VmError::GuestPanic` with this message and location and the VM is
    /// poisoned. Never returns. `SNAPVM_PANIC(msg)` in the header fills in
    /// the file and line.
    ///
    /// # Safety
    /// `message` must be valid for `len` byte reads (or null with 0);
    /// `file` null or NUL-terminated.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_panic(
        message: *const c_char,
        len: usize,
        file: *const c_char,
        line: u32,
    ) -> ! {
        // SAFETY: forwarded from the caller.
        let message = text(unsafe { bytes(message.cast(), len) });
        // SAFETY: forwarded from the caller.
        let file = text(unsafe { c_str(file) }.unwrap_or_default());
        rt::report_panic(&message, &file, line, 0)
    }

    /// Keeps the `len` bytes at `addr` across resets (see `preserve_region`).
    /// Returns [`SNAPVM_OK`], [`SNAPVM_ERR_OUT_OF_RANGE`] (not in the
    /// program's image or heap, or empty), [`SNAPVM_ERR_TOO_LARGE`] or
    /// [`SNAPVM_ERR_PROTOCOL`]. One VM exit.
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_preserve(addr: *const c_void, len: usize) -> i32 {
        match crate::preserve_region(addr as u64, len as u64) {
            Ok(()) => SNAPVM_OK,
            Err(PreserveError::OutOfRange) => SNAPVM_ERR_OUT_OF_RANGE,
            Err(PreserveError::TooLarge) => SNAPVM_ERR_TOO_LARGE,
            Err(PreserveError::Protocol(_)) => SNAPVM_ERR_PROTOCOL,
        }
    }

    /// Fills `len` bytes at `buf` with random bytes (ChaCha20 seeded with
    /// host entropy, reseeded on every restore and reset).
    ///
    /// # Safety
    /// `buf` must be valid for `len` byte writes (or null with 0).
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_random_bytes(buf: *mut c_void, len: usize) {
        // SAFETY: forwarded from the caller.
        crate::random_bytes(unsafe { bytes_mut(buf.cast(), len) });
    }

    /// A random `uint64_t` (see [`snapvm_random_bytes`]).
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_random_u64() -> u64 {
        crate::random_u64()
    }

    /// The generation of this VM lifetime: changes at boot and at every
    /// restore or reset.
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_generation() -> u64 {
        crate::generation()
    }

    fn run_c_hooks() {
        // Copy the list so a hook may register another hook.
        // SAFETY: single-threaded guest; the borrow ends before the hooks run.
        let hooks: Vec<SnapvmHook> = unsafe { (*HOOKS.get()).clone() };
        for hook in hooks {
            // SAFETY: registered with the `SnapvmHook` signature.
            unsafe { hook() };
        }
    }

    /// Registers `hook` to run after every restore or reset, before the
    /// next exported function. C hooks run in registration order (together,
    /// where the first one was registered among hooks from Rust code).
    /// Panics if `hook` is null.
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_on_restore(hook: Option<SnapvmHook>) {
        let Some(hook) = hook else {
            panic!("snapvm_on_restore: the hook is null");
        };
        // SAFETY: single-threaded guest; no other reference to the list.
        let hooks = unsafe { &mut *HOOKS.get() };
        if hooks.is_empty() {
            crate::on_restore(run_c_hooks);
        }
        hooks.push(hook);
    }

    /// Bytes in front of each block: its total size, keeping the block
    /// aligned to [`SNAPVM_ALLOC_ALIGN`].
    const HEADER: usize = SNAPVM_ALLOC_ALIGN;

    fn layout(size: usize) -> Option<Layout> {
        Layout::from_size_align(size.checked_add(HEADER)?, SNAPVM_ALLOC_ALIGN).ok()
    }

    /// Allocates `size` bytes (uninitialized, 16-byte aligned) on the guest
    /// heap, like `malloc`. Returns null when the heap has no room.
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_alloc(size: usize) -> *mut c_void {
        allocate(size, false)
    }

    /// Allocates `count * size` zeroed bytes, like `calloc`. Returns null
    /// when the heap has no room or the size overflows.
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_calloc(count: usize, size: usize) -> *mut c_void {
        match count.checked_mul(size) {
            Some(total) => allocate(total, true),
            None => ptr::null_mut(),
        }
    }

    fn allocate(size: usize, zeroed: bool) -> *mut c_void {
        let Some(layout) = layout(size) else {
            return ptr::null_mut();
        };
        // SAFETY: `layout` has a non-zero size (it includes the header).
        let block = unsafe {
            if zeroed {
                alloc::alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc::alloc(layout)
            }
        };
        if block.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: `block` holds `HEADER + size` bytes aligned to 16, so the
        // header word and the pointer past the header are in bounds.
        unsafe {
            block.cast::<usize>().write(size);
            block.add(HEADER).cast()
        }
    }

    /// Frees a block from [`snapvm_alloc`], [`snapvm_calloc`] or
    /// [`snapvm_realloc`]; null is ignored.
    ///
    /// # Safety
    /// `block` must be null or a block from these functions not yet freed.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_free(block: *mut c_void) {
        if block.is_null() {
            return;
        }
        // SAFETY: `block` came from `allocate`, so the header sits
        // `HEADER` bytes before it and holds the size it was made with.
        unsafe {
            let start = block.cast::<u8>().sub(HEADER);
            let size = start.cast::<usize>().read();
            let layout = layout(size).expect("the layout was valid when allocated");
            alloc::alloc::dealloc(start, layout);
        }
    }

    /// Resizes a block like `realloc`: null `block` allocates; a size of 0
    /// frees it and returns null; on failure the block is left as it was
    /// and null is returned.
    ///
    /// # Safety
    /// As [`snapvm_free`].
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_realloc(block: *mut c_void, size: usize) -> *mut c_void {
        if block.is_null() {
            return snapvm_alloc(size);
        }
        if size == 0 {
            // SAFETY: forwarded from the caller.
            unsafe { snapvm_free(block) };
            return ptr::null_mut();
        }
        let Some(new_layout) = layout(size) else {
            return ptr::null_mut();
        };
        // SAFETY: as in `snapvm_free`; `realloc` gets the old layout and a
        // non-zero new size valid for the alignment, and on success the
        // header is rewritten with the new size.
        unsafe {
            let start = block.cast::<u8>().sub(HEADER);
            let old = layout(start.cast::<usize>().read()).expect("valid when allocated");
            let moved = alloc::alloc::realloc(start, old, new_layout.size());
            if moved.is_null() {
                return ptr::null_mut();
            }
            moved.cast::<usize>().write(size);
            moved.add(HEADER).cast()
        }
    }

    /// Bytes currently allocated on the guest heap (Rust and C together).
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_heap_used() -> usize {
        crate::heap_used()
    }

    /// Reports the guest's own measure of garbage (see `report_garbage`).
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_report_garbage(bytes: u64) {
        crate::report_garbage(bytes);
    }

    /// Size of the scratch disk in bytes (0 without one).
    #[unsafe(no_mangle)]
    pub extern "C" fn snapvm_disk_size() -> u64 {
        crate::disk::size()
    }

    fn disk_status(result: Result<(), crate::disk::DiskError>) -> i32 {
        match result {
            Ok(()) => SNAPVM_OK,
            Err(crate::disk::DiskError::NoDisk) => SNAPVM_ERR_NO_DISK,
            Err(crate::disk::DiskError::OutOfRange) => SNAPVM_ERR_OUT_OF_RANGE,
        }
    }

    /// Reads `len` bytes at byte `offset` of the scratch disk into `buf`.
    /// Returns [`SNAPVM_OK`], [`SNAPVM_ERR_NO_DISK`] or
    /// [`SNAPVM_ERR_OUT_OF_RANGE`].
    ///
    /// # Safety
    /// `buf` must be valid for `len` byte writes (or null with 0).
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_disk_read(offset: u64, buf: *mut c_void, len: usize) -> i32 {
        // SAFETY: forwarded from the caller.
        disk_status(crate::disk::read(offset, unsafe {
            bytes_mut(buf.cast(), len)
        }))
    }

    /// Writes `len` bytes at `data` to byte `offset` of the scratch disk.
    /// Returns as [`snapvm_disk_read`].
    ///
    /// # Safety
    /// `data` must be valid for `len` byte reads (or null with 0).
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn snapvm_disk_write(
        offset: u64,
        data: *const c_void,
        len: usize,
    ) -> i32 {
        // SAFETY: forwarded from the caller.
        disk_status(crate::disk::write(offset, unsafe {
            bytes(data.cast(), len)
        }))
    }
}
