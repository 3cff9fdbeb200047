//! `libsnapvm_guest_c.a`: the snapvm guest runtime as a static library for
//! guests written in C (or any language that links C objects). It holds the
//! C interface declared in `guest/include/snapvm_guest.h` and defines the
//! program entry point `_start`, which runs the guest's
//! `void snapvm_init(void)` and then serves the host's calls.
#![no_std]

use snapvm_guest::capi;

unsafe extern "C" {
    /// The C guest's init function (see the header).
    fn snapvm_init();
}

/// Program entry point: boots the runtime with the C init function.
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    capi::start(snapvm_init)
}
