//! A guest written in C (guests/cguest/guest.c, linked against
//! libsnapvm_guest_c.a through guest/include/snapvm_guest.h) on real KVM:
//! exports, host calls, logs, panics and aborts, random bytes across
//! restores, restore hooks, preserved state and the heap.

mod common;

use std::sync::{Mutex, OnceLock};

use snapvm::{VmConfig, VmError, VmInstance, VmState};
use snapvm_guest::capi;

fn config() -> VmConfig {
    common::config("cguest")
        .host_function("greeting", |_| Ok(b"Hello".to_vec()))
        .host_function("repeat", |input| Ok(input.repeat(1000)))
        .host_function("upper", |input| Ok(input.to_ascii_uppercase()))
        .host_function("fails", |_| Err("nope".into()))
}

fn vm() -> VmInstance {
    VmInstance::new(&config()).expect("the C guest boots")
}

fn words(out: &[u8]) -> Vec<u64> {
    assert_eq!(out.len() % 8, 0, "{out:?}");
    out.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn c_exports_transform_their_input() {
    require_kvm!();
    let mut vm = vm();
    let mut names: Vec<_> = vm.functions().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "abort", "counters", "greet", "heap", "host_any", "host_big", "lifetime", "log",
            "panic", "random", "reverse", "twice", "upper"
        ]
    );
    assert_eq!(
        vm.invoke("upper", b"Hello, C guest!").unwrap(),
        b"HELLO, C GUEST!"
    );
    assert_eq!(vm.invoke("reverse", b"abc").unwrap(), b"cba");
    // Output copied from the output itself, large enough to make it grow.
    let text = common::pseudo_random(100_000, 3);
    assert_eq!(vm.invoke("twice", &text).unwrap(), text.repeat(2));
    assert_eq!(vm.invoke("upper", b"").unwrap(), b"");
    assert_eq!(vm.invoke("reverse", b"").unwrap(), b"");
    // Larger than the initial input buffer: the runtime grows it.
    let big = common::pseudo_random(1 << 20, 7);
    let reversed: Vec<u8> = big.iter().rev().copied().collect();
    assert_eq!(vm.invoke("reverse", &big).unwrap(), reversed);
    assert_eq!(vm.state(), VmState::Ready);
}

#[test]
fn host_calls_round_trip_from_c() {
    require_kvm!();
    let mut vm = vm();
    assert_eq!(vm.invoke("greet", b"snapvm").unwrap(), b"Hello, snapvm!");

    // A result that fits the 8-byte buffer, then one that does not and is
    // fetched with snapvm_host_result.
    let out = vm.invoke("host_big", b"").unwrap();
    assert_eq!(out, [capi::SNAPVM_OK as u8]);
    let out = vm.invoke("host_big", b"xyz").unwrap();
    assert_eq!(out[0], capi::SNAPVM_ERR_TOO_SMALL as u8);
    assert_eq!(&out[1..], b"xyz".repeat(1000));

    // snapvm_host_call_alloc: success, failure with the host's message,
    // an unknown name.
    let out = vm.invoke("host_any", b"upper").unwrap();
    assert_eq!((out[0], &out[1..]), (capi::SNAPVM_OK as u8, &b"ABC"[..]));
    let out = vm.invoke("host_any", b"fails").unwrap();
    assert_eq!(
        (out[0], &out[1..]),
        (capi::SNAPVM_ERR_FAILED as u8, &b"nope"[..])
    );
    let out = vm.invoke("host_any", b"missing").unwrap();
    assert_eq!(out, [capi::SNAPVM_ERR_UNKNOWN as u8]);
    assert_eq!(vm.state(), VmState::Ready);
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
fn c_log_messages_reach_the_log_facade() {
    require_kvm!();
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    let capture = CAPTURE.get_or_init(|| Capture(Mutex::new(Vec::new())));
    log::set_logger(capture).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    let mut vm = vm();
    assert_eq!(vm.invoke("log", b"logged from C").unwrap(), b"");
    let records = capture.0.lock().unwrap();
    for message in ["C guest ready", "logged from C"] {
        assert!(
            records.contains(&(log::Level::Info, "snapvm::guest".into(), message.into())),
            "{records:?}"
        );
    }
}

#[test]
fn a_c_panic_is_a_guest_panic_with_its_location() {
    require_kvm!();
    let mut vm = vm();
    match vm.invoke("panic", b"") {
        Err(VmError::GuestPanic { message, location }) => {
            assert_eq!(message, "the C guest panics on request");
            let location = location.expect("SNAPVM_PANIC passes __FILE__ and __LINE__");
            assert!(location.file.ends_with("guest.c"), "{location:?}");
            assert!(location.line > 0);
        }
        other => panic!("expected a guest panic, got {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Poisoned);
}

#[test]
fn a_c_abort_is_a_guest_abort_with_its_message() {
    require_kvm!();
    let mut vm = vm();
    match vm.invoke("abort", b"stopped by C") {
        Err(VmError::GuestAbort { message }) => assert_eq!(message, "stopped by C"),
        other => panic!("expected a guest abort, got {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Poisoned);
}

#[test]
fn random_bytes_and_generations_differ_between_restores_of_one_snapshot() {
    require_kvm!();
    let config = config();
    let mut fresh = VmInstance::new(&config).unwrap();
    let snap = fresh.snapshot().unwrap();
    // No restore yet: the C restore hook has not run.
    assert_eq!(words(&fresh.invoke("lifetime", b"").unwrap())[1], 0);

    let mut a = VmInstance::restore(&config, &snap).unwrap();
    let mut b = VmInstance::restore(&config, &snap).unwrap();
    let (ra, rb) = (
        a.invoke("random", b"").unwrap(),
        b.invoke("random", b"").unwrap(),
    );
    assert_eq!(ra.len(), 32);
    assert_ne!(ra, rb, "two restores of one snapshot share random bytes");
    assert_ne!(ra, fresh.invoke("random", b"").unwrap());
    let (la, lb) = (
        words(&a.invoke("lifetime", b"").unwrap()),
        words(&b.invoke("lifetime", b"").unwrap()),
    );
    assert_ne!(la[0], lb[0], "generations");
    assert_eq!(la[0], a.generation().0);
    // The hook ran once in each restored VM, before its first call.
    assert_eq!((la[1], lb[1]), (1, 1));

    // In place too: new random bytes, a new generation, the hook again.
    a.restore_in_place(&snap).unwrap();
    assert_ne!(a.invoke("random", b"").unwrap(), ra);
    let again = words(&a.invoke("lifetime", b"").unwrap());
    assert_ne!(again[0], la[0]);
    assert_eq!(again[1], 1);
}

#[test]
fn preserved_c_state_survives_restore_in_place() {
    require_kvm!();
    let mut vm = vm();
    let snap = vm.snapshot().unwrap();
    for i in 1..=3u64 {
        assert_eq!(words(&vm.invoke("counters", b"").unwrap()), [i, i]);
    }
    vm.restore_in_place(&snap).unwrap();
    // The preserved counter kept counting; the plain one is back at 0.
    assert_eq!(words(&vm.invoke("counters", b"").unwrap()), [4, 1]);
    // A panic poisons; restoring in place recovers, still preserving.
    assert!(vm.invoke("panic", b"").is_err());
    vm.restore_in_place(&snap).unwrap();
    assert_eq!(words(&vm.invoke("counters", b"").unwrap()), [5, 1]);
}

#[test]
fn c_heap_functions_allocate_and_free() {
    require_kvm!();
    let mut vm = vm();
    let out = vm.invoke("heap", b"").unwrap();
    assert_eq!(&out[..2], b"ok");
    assert_eq!(words(&out[2..]), [0], "the C code freed what it allocated");
}

/// The header defines the status codes and levels the runtime uses, and
/// declares every function the runtime defines.
#[test]
fn the_header_matches_the_runtime() {
    let header = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/guest/include/snapvm_guest.h"
    ))
    .unwrap();
    let defines: Vec<(&str, i64)> = header
        .lines()
        .filter_map(|line| {
            let mut parts = line.strip_prefix("#define ")?.split_whitespace();
            let (name, value) = (parts.next()?, parts.next()?);
            Some((name, value.parse().ok()?))
        })
        .collect();
    assert_eq!(defines, capi::HEADER_CONSTANTS);

    // Every `snapvm_name(` in the header: declarations, and calls in macros.
    let mut declared: Vec<&str> = header
        .match_indices("snapvm_")
        .filter(|&(at, _)| !header[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
        .filter_map(|(at, _)| {
            let rest = &header[at..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            rest[end..].starts_with('(').then(|| &rest[..end])
        })
        .filter(|&name| name != "snapvm_init")
        .collect();
    declared.sort();
    declared.dedup();
    let mut defined = capi::HEADER_FUNCTIONS.to_vec();
    defined.sort();
    assert_eq!(declared, defined);

    // And the C guest, which includes it, was built and is a static ELF.
    let elf = std::fs::read(common::guest_path("cguest")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
}
