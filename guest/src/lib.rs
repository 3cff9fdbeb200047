//! `snapvm-guest`: the runtime a snapvm guest program links.
//!
//! A guest is an ordinary `#![no_std]` Rust program with `alloc`. It names an
//! init function with [`entry!`]; init exports functions by name and may do
//! any expensive set-up once (parse data, fill caches). When init returns the
//! VM is *ready*: the host invokes exported functions with bytes in and bytes
//! out, and (with snapshots) captures exactly this state.
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! extern crate alloc;
//! use alloc::vec::Vec;
//!
//! snapvm_guest::entry!(init);
//!
//! fn init(exports: &mut snapvm_guest::Exports) {
//!     exports.export("reverse", reverse);
//! }
//!
//! fn reverse(input: &[u8]) -> Vec<u8> {
//!     snapvm_guest::info!("reversing {} bytes", input.len());
//!     input.iter().rev().copied().collect()
//! }
//! ```
//!
//! Build it for the host triple with `panic = "abort"` and the linker
//! arguments in `docs/guest-guide.md`; no nightly and no extra target needed.
//!
//! # Features
//! - `runtime` (default): the entry point, global allocator, panic handler and
//!   the C memory functions. Without it only [`abi`] (the `snapvm-abi` crate)
//!   and the constants of [`capi`] are compiled.
//! - `serde` (off by default): typed exports (`Exports::export_typed`) and
//!   typed host calls (`host::call_typed`), encoded with postcard.
//! - `net` (off by default): guest networking on the host's network device
//!   — a TCP/IP stack (smoltcp) with blocking `net::TcpStream` and
//!   `net::TcpListener`; see `docs/networking.md`.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// The host/guest ABI, shared with the host crate (`snapvm::abi`); defined
/// in the `snapvm-abi` crate.
///
// The empty line ends the paragraph: rustdoc appends the crate's own docs.
#[doc(inline)]
pub use snapvm_abi as abi;
pub mod capi;

#[cfg(feature = "runtime")]
mod rt;

/// Guest networking (the `net` feature).
#[cfg(feature = "net")]
#[cfg_attr(docsrs, doc(cfg(feature = "net")))]
pub use rt::net;
#[cfg(feature = "runtime")]
pub use rt::{
    __start, abort, disk, generation, heap_used, host, log_enabled, log_message, on_restore,
    preserve, preserve_region, random_bytes, random_u64, report_garbage, trace, tx, Exports,
    FallibleGuestFn, GuestError, GuestFn, LogLevel, PreserveError,
};

/// Declares the guest's init function and the program entry point.
///
/// `init` has the signature `fn(&mut Exports)`; it runs once when the VM
/// boots. When it returns the VM is ready and the host may invoke any function
/// it exported.
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! entry {
    ($init:path) => {
        /// Program entry point: runs init, then serves the host's requests.
        #[unsafe(no_mangle)]
        pub extern "C" fn _start() -> ! {
            $crate::__start($init)
        }
    };
}

/// Logs a message to the host at a given [`LogLevel`], `format!`-style.
///
/// The host delivers it through the `log` facade with target `snapvm::guest`.
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {{
        let level = $level;
        if $crate::log_enabled(level) {
            $crate::log_message(level, format_args!($($arg)+))
        }
    }};
}

/// Logs at [`LogLevel::Error`].
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Error, $($arg)+) }; }
/// Logs at [`LogLevel::Warn`].
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Warn, $($arg)+) }; }
/// Logs at [`LogLevel::Info`].
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Info, $($arg)+) }; }
/// Logs at [`LogLevel::Debug`].
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Debug, $($arg)+) }; }
/// Logs at [`LogLevel::Trace`].
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Trace, $($arg)+) }; }
