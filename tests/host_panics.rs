//! A panic in host code that runs while the guest is stopped mid-call (here:
//! the host's logger, called for a guest log message with the timeout timer
//! armed) unwinds through `invoke`: the VM must not claim to be ready, and
//! the thread's timeout timer must be off afterwards. Its own test binary:
//! it installs a process-wide logger.

mod common;

use std::time::Duration;

use snapvm::{VmInstance, VmState};

/// A logger that panics on one message.
struct PanickingLogger;

impl log::Log for PanickingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if record.args().to_string().contains("PANIC-IN-LOGGER") {
            panic!("the logger failed");
        }
    }
    fn flush(&self) {}
}

/// Sleeps `d` with `nanosleep` and says whether a signal interrupted it.
fn sleep_interrupted(d: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    };
    // SAFETY: a valid timespec; no remainder wanted.
    let rc = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    rc != 0
}

#[test]
fn a_panic_unwinding_out_of_a_call_leaves_no_timer_and_no_ready_vm() {
    require_kvm!();
    log::set_logger(&PanickingLogger).expect("first logger");
    log::set_max_level(log::LevelFilter::Trace);
    let config = common::config("testguest").timeout(Some(Duration::from_millis(20)));
    let mut vm = VmInstance::new(&config).unwrap();
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vm.invoke("log", b"PANIC-IN-LOGGER")
    }));
    assert!(unwound.is_err(), "the logger's panic unwinds to the caller");
    assert_eq!(vm.state(), VmState::Poisoned, "the guest is still mid-call");
    // The 20 ms timer, re-firing every 5 ms, would interrupt this sleep.
    assert!(
        !sleep_interrupted(Duration::from_millis(100)),
        "the timeout timer is still armed"
    );
}
