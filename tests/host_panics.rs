//! Host code that sees guest logs, with a process-wide logger (hence its own
//! test binary): a panic in the logger (called for a guest log message with
//! the timeout timer armed) unwinds through `invoke` — the VM must not claim
//! to be ready, and the thread's timeout timer must be off afterwards; and
//! the per-call log budget stops a guest from flooding the host's logs.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use snapvm::{VmInstance, VmState};

/// A logger that records guest messages and panics on one of them.
struct PanickingLogger;

static RECORDED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn recorded() -> Vec<String> {
    RECORDED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl log::Log for PanickingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        if text.contains("PANIC-IN-LOGGER") {
            panic!("the logger failed");
        }
        if record.target().starts_with("snapvm::guest") {
            let kv = record.key_values();
            let field = |key: &str| kv.get(log::kv::Key::from(key)).map(|v| v.to_string());
            let mut recorded = RECORDED.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some(function), Some(generation)) = (field("function"), field("generation")) {
                recorded.push(format!(
                    "fields function={function} generation={generation}"
                ));
            }
            recorded.push(text);
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

fn install_logger() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&PanickingLogger).expect("first logger");
        // Info: guests must see that debug and trace are off.
        log::set_max_level(log::LevelFilter::Info);
    });
}

#[test]
fn the_log_budget_bounds_what_one_call_logs() {
    require_kvm!();
    install_logger();
    // The testguest's `log` says "guest says <input>" then "a warning".
    let config = common::config("testguest").log_budget(20);
    let mut vm = VmInstance::new(&config).unwrap();
    for round in 0..2 {
        let marker = format!("budget{round}");
        vm.invoke("log", marker.as_bytes()).unwrap();
        let logs = recorded();
        let first = format!("guest says {marker}");
        assert!(logs.contains(&first), "{logs:?}");
        let after = &logs[logs.iter().position(|l| *l == first).unwrap() + 1..];
        assert!(
            !after.iter().any(|l| l == "a warning"),
            "over the budget: {logs:?}"
        );
        assert!(after.iter().any(|l| l.contains("budget")), "{logs:?}");
    }
    assert_eq!(vm.state(), VmState::Ready);
    // Every guest message carries the function and the generation.
    let fields = format!("fields function=log generation={}", vm.generation());
    assert!(recorded().contains(&fields), "{:?}", recorded());
}

#[test]
fn a_panic_unwinding_out_of_a_call_leaves_no_timer_and_no_ready_vm() {
    require_kvm!();
    install_logger();
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

#[test]
fn the_guest_sees_the_hosts_log_level_and_skips_what_is_off() {
    require_kvm!();
    install_logger();
    let mut vm = VmInstance::new(&common::config("testguest")).unwrap();
    // error, warn, info on; debug, trace off.
    assert_eq!(vm.invoke("log_levels", b"").unwrap(), [1, 1, 1, 0, 0]);
    let logs = recorded();
    assert!(!logs
        .iter()
        .any(|l| l.contains("a debug message") || l.contains("a trace")));
}
