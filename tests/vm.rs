//! VmInstance on real KVM: calls, large buffers, host functions, logging,
//! and every kind of guest failure as a typed error.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapvm::vm::HypercallFault;
use snapvm::{VmConfig, VmError, VmInstance, VmState};

fn testguest() -> VmConfig {
    common::config("testguest")
        .host_function("double", |input| {
            Ok(input.iter().map(|b| b.wrapping_mul(2)).collect())
        })
        .host_function("big", |input| {
            Ok(vec![input.first().copied().unwrap_or(7); 1 << 20])
        })
        .host_function("fail", |_| Err("nope".into()))
}

fn vm() -> VmInstance {
    VmInstance::new(&testguest()).expect("testguest boots")
}

/// Invokes `name` and returns the error, asserting that the VM is poisoned
/// afterwards and refuses further calls.
fn poisoning_error(name: &str) -> VmError {
    let mut vm = vm();
    let err = vm.invoke(name, b"").expect_err("the call must fail");
    assert!(err.poisons(), "{err:?} should poison");
    assert_eq!(vm.state(), VmState::Poisoned);
    assert!(matches!(
        vm.invoke("empty", b""),
        Err(VmError::Poisoned { .. })
    ));
    err
}

#[test]
fn invoke_runs_functions_and_guest_state_persists_between_calls() {
    require_kvm!();
    let mut vm = vm();
    assert_eq!(vm.state(), VmState::Ready);
    assert_eq!(vm.invoke("echo", b"abc").unwrap(), b"abc");
    assert_eq!(vm.invoke("empty", b"ignored").unwrap(), b"");
    for expected in 1u64..=3 {
        assert_eq!(vm.invoke("counter", b"").unwrap(), expected.to_le_bytes());
    }
    assert_eq!(vm.stats().invocations, 5);
    let mut names: Vec<_> = vm.functions().collect();
    names.sort();
    assert!(names.contains(&"echo") && names.contains(&"panic"));
}

#[test]
fn sixteen_mib_inputs_and_outputs_round_trip() {
    require_kvm!();
    let mut vm = VmInstance::new(&testguest().memory_size(128 << 20)).unwrap();
    let input: Vec<u8> = (0..16u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    assert_eq!(vm.invoke("echo", &input).unwrap(), input);

    let mut out = vec![0u8; 16 << 20];
    let len = vm.invoke_into("echo", &input, &mut out).unwrap();
    assert_eq!(len, input.len());
    assert_eq!(out, input);
    // A smaller input after a large one reuses the grown buffer.
    assert_eq!(vm.invoke("echo", b"small").unwrap(), b"small");
}

#[test]
fn invoke_into_reports_a_small_buffer_and_the_vm_stays_ready() {
    require_kvm!();
    let mut vm = vm();
    let mut out = [0u8; 4];
    match vm.invoke_into("echo", b"too long", &mut out) {
        Err(VmError::OutputBufferTooSmall {
            needed: 8,
            capacity: 4,
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Ready);
    assert_eq!(vm.invoke_into("echo", b"ok", &mut out).unwrap(), 2);
    assert_eq!(&out[..2], b"ok");
}

#[test]
fn unknown_function_is_a_typed_error_that_does_not_poison() {
    require_kvm!();
    let mut vm = vm();
    match vm.invoke("no_such_function", b"") {
        Err(VmError::UnknownFunction { name }) => assert_eq!(name, "no_such_function"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.invoke("echo", b"x").unwrap(), b"x");
}

#[test]
fn guest_panic_carries_message_and_location() {
    require_kvm!();
    match poisoning_error("panic") {
        VmError::GuestPanic { message, location } => {
            assert_eq!(message, "boom 42");
            let location = location.expect("location");
            assert!(location.file.ends_with("main.rs"), "{location}");
            assert!(location.line > 0);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn guest_abort_carries_its_message() {
    require_kvm!();
    match poisoning_error("abort") {
        VmError::GuestAbort { message } => assert_eq!(message, "refusing this input"),
        other => panic!("unexpected {other:?}"),
    }
}

fn fault(name: &str) -> snapvm::vm::GuestFault {
    match poisoning_error(name) {
        VmError::GuestFault(fault) => fault,
        other => panic!("{name}: unexpected {other:?}"),
    }
}

#[test]
fn null_dereference_is_a_page_fault_at_address_zero() {
    require_kvm!();
    let f = fault("null_deref");
    assert_eq!(f.vector, 14);
    assert_eq!(f.addr, Some(0));
    assert!(f.is_null_dereference());
    // User-mode read of a non-present page.
    assert_eq!(f.error_code & 0b101, 0b100);
    assert!(f.rip >= snapvm::abi::USER_BASE, "rip {:#x}", f.rip);
}

#[test]
fn division_by_zero_is_vector_0() {
    require_kvm!();
    let f = fault("div_zero");
    assert_eq!((f.vector, f.addr), (0, None));
}

#[test]
fn stack_overflow_hits_the_guard_page() {
    require_kvm!();
    let f = fault("stack_overflow");
    assert_eq!(f.vector, 14);
    assert!(f.is_stack_overflow(), "{f}");
}

#[test]
fn invalid_opcode_is_vector_6() {
    require_kvm!();
    assert_eq!(fault("invalid_opcode").vector, 6);
}

#[test]
fn ports_outside_the_bitmap_and_privileged_instructions_are_general_protection_faults() {
    require_kvm!();
    assert_eq!(fault("bad_port").vector, 13);
    assert_eq!(fault("privileged").vector, 13);
}

#[test]
fn the_system_area_is_not_writable_from_guest_code() {
    require_kvm!();
    let f = fault("write_system_area");
    assert_eq!(f.vector, 14);
    assert_eq!(f.addr, Some(snapvm::abi::SYSTEM_AREA_START));
    // Present page, write, user mode: a protection violation.
    assert_eq!(f.error_code & 0b111, 0b111);
}

#[test]
fn an_infinite_loop_times_out_and_the_thread_stays_usable() {
    require_kvm!();
    let limit = Duration::from_millis(200);
    let mut vm = VmInstance::new(&testguest().timeout(Some(limit))).unwrap();
    let start = Instant::now();
    let err = vm.invoke("infinite_loop", b"").unwrap_err();
    let elapsed = start.elapsed();
    assert!(
        matches!(err, VmError::Timeout { limit: l, .. } if l == limit),
        "{err:?}"
    );
    // The timer never fires early. How late it fires depends on the host's
    // load (it re-fires every 5 ms once due); this only checks that it does
    // fire, allowing a loaded CI machine seconds of scheduling delay. The
    // report measures the real overshoot.
    assert!(
        elapsed >= limit && elapsed < limit + Duration::from_secs(5),
        "took {elapsed:?}"
    );
    assert_eq!(vm.state(), VmState::Poisoned);
    // The thread is free: another VM on it works, and its timer still fires.
    let mut other = VmInstance::new(&testguest().timeout(Some(limit))).unwrap();
    assert_eq!(other.invoke("echo", b"after").unwrap(), b"after");
    assert!(matches!(
        other.invoke("infinite_loop", b""),
        Err(VmError::Timeout { .. })
    ));
}

#[test]
fn hostile_hypercalls_are_typed_errors() {
    require_kvm!();
    assert!(matches!(
        poisoning_error("bad_log_pointer"),
        VmError::BadHypercall {
            hypercall: "Log",
            reason: HypercallFault::NotGuestMemory { .. }
        }
    ));
    assert!(matches!(
        poisoning_error("overflowing_length"),
        VmError::BadHypercall {
            hypercall: "HostCall",
            reason: HypercallFault::NotGuestMemory { .. }
        }
    ));
    assert!(matches!(
        poisoning_error("unknown_hypercall"),
        VmError::UnknownHypercall { nr: 0xDEAD }
    ));
    assert!(matches!(
        poisoning_error("output_outside_memory"),
        VmError::BadHypercall {
            hypercall: "Done",
            reason: HypercallFault::NotGuestMemory { .. }
        }
    ));
}

#[test]
fn oversized_output_is_rejected_and_the_vm_stays_ready() {
    require_kvm!();
    let mut vm = VmInstance::new(&testguest().max_output(1 << 20)).unwrap();
    let two_mib = (2u64 << 20).to_le_bytes();
    match vm.invoke("output_of_size", &two_mib) {
        Err(VmError::OutputTooLarge { len, limit }) => assert_eq!((len, limit), (2 << 20, 1 << 20)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Ready);
    let one_mib = (1u64 << 20).to_le_bytes();
    assert_eq!(
        vm.invoke("output_of_size", &one_mib).unwrap().len(),
        1 << 20
    );
}

#[test]
fn inputs_the_guest_cannot_hold_are_rejected_without_poisoning() {
    require_kvm!();
    let mut vm = vm();
    // Larger than guest memory: rejected before the guest runs.
    let huge = vec![0u8; 80 << 20];
    assert!(
        matches!(vm.invoke("echo", &huge), Err(VmError::InputTooLarge { len }) if len == 80 << 20)
    );
    // Fits in memory but not in the heap: the guest says it is out of memory.
    let large = vec![0u8; 63 << 20];
    assert!(matches!(
        vm.invoke("echo", &large),
        Err(VmError::InputTooLarge { .. })
    ));
    assert_eq!(vm.invoke("echo", b"still fine").unwrap(), b"still fine");
}

#[test]
fn guest_out_of_memory_is_a_typed_error() {
    require_kvm!();
    let mut vm = vm();
    match vm.invoke("alloc_mib", &[100]) {
        Err(VmError::GuestOutOfMemory { requested, .. }) => assert_eq!(requested, 100 << 20),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Poisoned);
}

#[test]
fn host_functions_are_called_synchronously() {
    require_kvm!();
    let mut vm = vm();
    assert_eq!(
        vm.invoke("host_call", b"double\n\x01\x02\x03").unwrap(),
        b"ok:\x02\x04\x06"
    );
    // A result larger than the guest's first buffer takes the second path.
    let big = vm.invoke("host_call", b"big\n\x09").unwrap();
    assert_eq!(&big[..3], b"ok:");
    assert_eq!(big.len(), 3 + (1 << 20));
    assert!(big[3..].iter().all(|&b| b == 9));
    assert_eq!(
        vm.invoke("host_call", b"fail\n").unwrap(),
        b"err:host function failed: nope"
    );
    assert_eq!(
        vm.invoke("host_call", b"missing\n").unwrap(),
        b"err:no such host function"
    );
}

struct Capture(Mutex<Vec<(log::Level, String, String)>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let entry = (
            record.level(),
            record.target().to_string(),
            record.args().to_string(),
        );
        self.0.lock().unwrap().push(entry);
    }
    fn flush(&self) {}
}

#[test]
fn guest_logs_reach_the_log_facade() {
    require_kvm!();
    let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
    log::set_logger(capture).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    vm().invoke("log", b"hi").unwrap();
    let records = capture.0.lock().unwrap();
    assert!(records.contains(&(
        log::Level::Info,
        "snapvm::guest".into(),
        "guest says hi".into()
    )));
    assert!(records.contains(&(log::Level::Warn, "snapvm::guest".into(), "a warning".into())));
}

#[test]
fn sse_and_avx_work_in_guest_functions() {
    require_kvm!();
    if !std::arch::is_x86_feature_detected!("avx") {
        eprintln!("skipped: the host CPU has no AVX");
        return;
    }
    let out = vm().invoke("sse_avx", &[1, 2, 3, 4, 10]).unwrap();
    let sse = f64::from_le_bytes(out[..8].try_into().unwrap());
    let avx = f64::from_le_bytes(out[8..].try_into().unwrap());
    assert_eq!(sse, 30.0);
    assert_eq!(avx, 20.0);
}

#[test]
fn a_vm_moves_between_threads() {
    require_kvm!();
    let vm = Arc::new(Mutex::new(vm()));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let vm = Arc::clone(&vm);
            std::thread::spawn(move || vm.lock().unwrap().invoke("counter", b"").unwrap())
        })
        .collect();
    let mut seen: Vec<u64> = handles
        .into_iter()
        .map(|h| u64::from_le_bytes(h.join().unwrap().try_into().unwrap()))
        .collect();
    seen.sort();
    assert_eq!(seen, [1, 2, 3, 4]);
    let owned = std::thread::spawn(move || {
        let mut vm = Arc::into_inner(vm).unwrap().into_inner().unwrap();
        vm.invoke("counter", b"").unwrap()
    });
    assert_eq!(owned.join().unwrap(), 5u64.to_le_bytes());
}

#[test]
fn triple_fault_is_a_shutdown_error() {
    require_kvm!();
    // Guest functions run at CPL3 and cannot touch the IDT, so a guest
    // program cannot triple-fault; the bare baseline VM can, once its IDT
    // is removed.
    let mut raw = snapvm::vm::raw::RawGuest::new(&[0x0F, 0x0B], 4 << 20).unwrap();
    raw.remove_idt().unwrap();
    assert!(matches!(raw.run_once(), Err(VmError::Shutdown)));
}

#[test]
fn invalid_configurations_are_rejected_before_any_vm_exists() {
    require_kvm!();
    for (size, what) in [
        (3 << 20, "not 2 MiB aligned"),
        (2 << 20, "too small"),
        (128 << 30, "too big"),
    ] {
        assert!(
            matches!(
                VmInstance::new(&testguest().memory_size(size)),
                Err(VmError::InvalidConfig {
                    field: "memory_size",
                    ..
                })
            ),
            "{what}"
        );
    }
    assert!(matches!(
        VmInstance::new(&testguest().timeout(Some(Duration::ZERO))),
        Err(VmError::InvalidConfig {
            field: "timeout",
            ..
        })
    ));
    assert!(matches!(
        VmInstance::new(&testguest().host_function("", |_| Ok(Vec::new()))),
        Err(VmError::InvalidConfig {
            field: "host_function",
            ..
        })
    ));
}

#[test]
fn guests_up_to_4_gib_boot() {
    require_kvm!();
    let mut vm = VmInstance::new(&testguest().memory_size(4 << 30)).unwrap();
    assert_eq!(vm.memory_size(), 4 << 30);
    // 1 GiB on the heap: page tables beyond the first GiB work.
    assert_eq!(vm.invoke("alloc_mib", &[255]).unwrap(), b"");
    assert_eq!(vm.invoke("alloc_mib", &[255]).unwrap(), b"");
    assert_eq!(vm.invoke("alloc_mib", &[255]).unwrap(), b"");
    assert_eq!(vm.invoke("alloc_mib", &[255]).unwrap(), b"");
}

#[test]
fn missing_kvm_device_is_explained() {
    let err = snapvm::vm::check_kvm_device(std::path::Path::new("/nonexistent/kvm")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, VmError::KvmUnavailable { .. }), "{err:?}");
    assert!(
        text.contains("kvm module") || text.contains("KVM is not available"),
        "{text}"
    );
    let not_kvm = snapvm::vm::check_kvm_device(std::path::Path::new("/dev/null")).unwrap_err();
    assert!(
        matches!(not_kvm, VmError::KvmUnavailable { .. }),
        "{not_kvm:?}"
    );
}
