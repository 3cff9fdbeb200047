//! Fuzzes hypercall handling against a real VM: the input becomes a script
//! for `guests/rawguest` (arbitrary ABI-page contents, hypercalls and
//! arguments, port and privileged instructions), and the host then calls
//! the guest's functions and rewinds it a few times.
//!
//! Run with `cargo +nightly fuzz run hypercalls fuzz/corpus/hypercalls` from
//! the repository root; it needs `/dev/kvm`. The input format (a flag byte,
//! a call-plan byte, script words) and the invariants checked are described
//! in `snapvm::fuzzing::hypercalls`. A boot that fails with a typed error is a
//! normal outcome; a panic — a broken invariant or a host panic — is a bug.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use snapvm::fuzzing::hypercalls as fuzzing;
use snapvm::GuestProgram;

/// rawguest, loaded once per process.
fn program() -> &'static GuestProgram {
    static PROGRAM: OnceLock<GuestProgram> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let path = fuzzing::rawguest_path();
        GuestProgram::from_file(&path)
            .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::run_hypercall_script(program(), data);
});
