//! A VM is `Ready` only when it is: failure-atomic restores and calls,
//! limits on what the host copies for a guest, host functions that fail or
//! panic, and `ManagedVm` resets that fail — on real KVM.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snapvm::{policy, ManagedVm, Snapshot, SnapshotError, VmConfig, VmError, VmInstance, VmState};

fn testguest() -> VmConfig {
    common::config("testguest")
}

fn counter(out: &[u8]) -> u64 {
    u64::from_le_bytes(out.try_into().expect("8 bytes"))
}

/// Saves `snapshot` to a file and flips one byte of guest data in it (the
/// text of the testguest's abort message), so the memory block holding it
/// fails its checksum when first used.
fn corrupt_copy(snapshot: &Snapshot, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("corrupt.snap");
    snapshot.save(&path).expect("save");
    let mut bytes = std::fs::read(&path).expect("read");
    let needle = b"refusing this input";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the guest's rodata is in the image");
    bytes[at] ^= 0x20;
    std::fs::write(&path, bytes).expect("write");
    path
}

#[test]
fn a_failed_restore_in_place_leaves_the_vm_poisoned_until_a_good_one() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = testguest().dirty_tracking(true);
    let mut vm = VmInstance::new(&config).unwrap();
    let ready = vm.snapshot().unwrap();
    let corrupt = Snapshot::load(corrupt_copy(&ready, dir.path())).expect("loads (checked lazily)");
    assert_eq!(counter(&vm.invoke("counter", b"").unwrap()), 1);

    let err = vm.restore_in_place(&corrupt).expect_err("a corrupt block");
    assert!(matches!(err, SnapshotError::CorruptMemory { .. }), "{err}");
    assert_eq!(
        vm.state(),
        VmState::Poisoned,
        "half-rewound memory is not ready"
    );
    assert!(matches!(
        vm.invoke("counter", b""),
        Err(VmError::Poisoned { .. })
    ));
    // Retrying the same corrupt restore fails the same way, every time.
    assert!(vm.restore_in_place(&corrupt).is_err());
    assert_eq!(vm.state(), VmState::Poisoned);

    vm.restore_in_place(&ready).expect("a good snapshot");
    assert_eq!(vm.state(), VmState::Ready);
    assert_eq!(counter(&vm.invoke("counter", b"").unwrap()), 1);
    // Tracking works again after the full rewind: a dirty-page reset.
    vm.restore_in_place(&ready).unwrap();
    assert_eq!(counter(&vm.invoke("counter", b"").unwrap()), 1);
}

#[test]
fn managed_vm_keeps_a_calls_result_when_the_reset_after_it_fails() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = testguest().dirty_tracking(true);
    let template = VmInstance::new(&config).unwrap();
    let path = dir.path().join("ready.snap");
    let mut template = template;
    template.snapshot().unwrap().save(&path).unwrap();
    let ready = Snapshot::load(&path).unwrap();
    let vm = VmInstance::restore(&config, &ready).unwrap();
    let mut managed = ManagedVm::new(vm, ready, policy::Always).unwrap();
    assert_eq!(counter(&managed.invoke("counter", b"").unwrap()), 1);

    // The snapshot file changes under the loaded snapshot: resets to it fail.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.push(0);
    std::fs::write(&path, bytes).unwrap();
    let out = managed
        .invoke("counter", b"")
        .expect("the call itself succeeded");
    assert_eq!(counter(&out), 1, "the call ran on a reset VM");
    // The reset it owes is retried first; while it fails, nothing runs.
    let err = managed
        .invoke("counter", b"")
        .expect_err("no reset, no call");
    assert!(
        matches!(
            err,
            snapvm::Error::Snapshot(SnapshotError::FileChanged { .. })
        ),
        "{err}"
    );
}

#[test]
fn host_call_limits_fail_the_guests_call_not_the_host() {
    require_kvm!();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let config = testguest()
        .host_call_limits(64 << 10, 1 << 10)
        .host_function("count", move |input| {
            seen.fetch_add(1, Ordering::Relaxed);
            Ok(input.to_vec())
        });
    let mut vm = VmInstance::new(&config).unwrap();
    let mut request = b"count\n".to_vec();
    request.extend(std::iter::repeat_n(7u8, 512));
    let out = vm.invoke("host_call", &request).unwrap();
    assert_eq!(&out[..3], b"ok:");
    assert_eq!(calls.load(Ordering::Relaxed), 1);

    // A result over the output limit.
    request.extend(std::iter::repeat_n(7u8, 2048));
    let out = vm.invoke("host_call", &request).unwrap();
    assert!(
        out.starts_with(b"err:"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(String::from_utf8_lossy(&out).contains("limit"));

    // An input over the input limit: the function never runs.
    let mut request = b"count\n".to_vec();
    request.extend(std::iter::repeat_n(7u8, 128 << 10));
    let before = calls.load(Ordering::Relaxed);
    let out = vm.invoke("host_call", &request).unwrap();
    assert!(
        out.starts_with(b"err:"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(calls.load(Ordering::Relaxed), before);
    assert_eq!(vm.state(), VmState::Ready);

    // An unknown name is resolved before the (oversized) input is looked at.
    let mut request = b"nosuch\n".to_vec();
    request.extend(std::iter::repeat_n(7u8, 128 << 10));
    let out = vm.invoke("host_call", &request).unwrap();
    assert!(
        String::from_utf8_lossy(&out).contains("no such host function"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_panicking_host_function_poisons_the_vm_and_not_the_host() {
    require_kvm!();
    let config = testguest().host_function("explode", |_| panic!("host bug"));
    let mut vm = VmInstance::new(&config).unwrap();
    match vm.invoke("host_call", b"explode\nx") {
        Err(VmError::HostFunctionPanic { name, message }) => {
            assert_eq!((name.as_str(), message.as_str()), ("explode", "host bug"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Poisoned);
    assert!(matches!(
        vm.invoke("echo", b"next"),
        Err(VmError::Poisoned { .. })
    ));
}

#[test]
fn out_of_memory_reports_the_heap_at_the_failure() {
    require_kvm!();
    let mut vm = VmInstance::new(&testguest()).unwrap();
    let before = vm.stats().heap_used;
    match vm.invoke("alloc_then_oom", &[4]) {
        Err(VmError::GuestOutOfMemory {
            requested,
            heap_used,
        }) => {
            assert_eq!(requested, 1 << 40);
            assert!(
                heap_used >= before + (4 << 20),
                "{heap_used} does not count the 4 MiB this call kept ({before} before)"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_timeout_then_a_reset_then_calls_work() {
    require_kvm!();
    let config = testguest()
        .dirty_tracking(true)
        .timeout(Some(Duration::from_millis(50)));
    let mut vm = VmInstance::new(&config).unwrap();
    let ready = vm.snapshot().unwrap();
    for _ in 0..3 {
        assert!(matches!(
            vm.invoke("infinite_loop", b""),
            Err(VmError::Timeout { .. })
        ));
        vm.restore_in_place(&ready).unwrap();
        assert_eq!(vm.invoke("echo", b"after").unwrap(), b"after");
    }
}

#[test]
fn a_guest_error_is_typed_and_does_not_poison() {
    require_kvm!();
    let mut vm = VmInstance::new(&testguest()).unwrap();
    assert_eq!(vm.invoke("fallible", b"ok").unwrap(), b"fine");
    match vm.invoke("fallible", b"nope") {
        Err(VmError::GuestError { code, message }) => {
            assert_eq!((code, message.as_str()), (42, "cannot handle 4 bytes"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Ready);
    assert!(!VmError::GuestError {
        code: 1,
        message: String::new()
    }
    .poisons());
    // The guest kept its state: the counter saw all three calls.
    assert_eq!(vm.invoke("fallible", b"ok").unwrap(), b"fine");
    assert_eq!(counter(&vm.invoke("counter", b"").unwrap()), 4);
}

/// Interrupts `vm`'s call from another thread once `started` says so.
fn interrupt_when(handle: snapvm::vm::InterruptHandle, started: Arc<AtomicUsize>) -> Kicker {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = std::thread::spawn({
        let done = Arc::clone(&done);
        move || {
            while started.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            // Again and again until the call returned: an interrupt that
            // lands before the call entered the guest stops nothing (a slow
            // or emulated host may take longer than one period to get
            // there), and the test must end rather than hang.
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(30));
                handle.interrupt();
            }
        }
    });
    Kicker { done, thread }
}

/// The thread of [`interrupt_when`].
struct Kicker {
    done: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Kicker {
    /// Stops interrupting (call it once the interrupted call returned,
    /// before the next call starts).
    fn stop(self) {
        self.done.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
    }
}

#[test]
fn an_interrupt_from_another_thread_cancels_a_running_call() {
    require_kvm!();
    // No timeout: only the interrupt can end the loop.
    let config = testguest().dirty_tracking(true).timeout(None);
    let mut vm = VmInstance::new(&config).unwrap();
    let ready = vm.snapshot().unwrap();
    // Nothing running: an interrupt now does not cancel a later call.
    vm.interrupt_handle().interrupt();
    assert_eq!(vm.invoke("echo", b"first").unwrap(), b"first");

    let started = Arc::new(AtomicUsize::new(1));
    let kicker = interrupt_when(vm.interrupt_handle(), Arc::clone(&started));
    let err = vm.invoke("infinite_loop", b"").expect_err("cancelled");
    kicker.stop();
    assert!(matches!(err, VmError::Cancelled), "{err}");
    assert!(err.poisons());
    assert_eq!(vm.state(), VmState::Poisoned);
    vm.restore_in_place(&ready).unwrap();
    assert_eq!(vm.invoke("echo", b"after").unwrap(), b"after");
}

#[test]
fn an_interrupt_during_a_host_function_cancels_when_it_returns() {
    require_kvm!();
    let started = Arc::new(AtomicUsize::new(0));
    let flag = Arc::clone(&started);
    let config = testguest()
        .dirty_tracking(true)
        .host_function("slow", move |_| {
            flag.store(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            Ok(b"done".to_vec())
        });
    let mut vm = VmInstance::new(&config).unwrap();
    let ready = vm.snapshot().unwrap();
    let kicker = interrupt_when(vm.interrupt_handle(), Arc::clone(&started));
    let err = vm.invoke("host_call", b"slow\n").expect_err("cancelled");
    kicker.stop();
    assert!(matches!(err, VmError::Cancelled), "{err}");
    vm.restore_in_place(&ready).unwrap();
    started.store(0, Ordering::SeqCst);
    assert_eq!(vm.invoke("echo", b"again").unwrap(), b"again");
}

/// A host function that sleeps stands in for a loaded host: wall-clock
/// time passes while the vCPU thread uses no CPU.
#[test]
fn timeouts_run_on_the_clock_the_config_chooses() {
    require_kvm!();
    let sleepy = || {
        testguest().host_function("sleep", |_| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(Vec::new())
        })
    };
    let limit = Duration::from_millis(150);
    // Wall clock (the default): the sleep counts, and the error says why a
    // short call could time out.
    let mut vm = VmInstance::new(&sleepy().timeout(Some(limit))).unwrap();
    let err = vm
        .invoke("host_call", b"sleep\n")
        .expect_err("wall-clock timeout");
    assert!(
        matches!(
            err,
            VmError::Timeout {
                clock: snapvm::vm::TimeoutClock::Wall,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("ThreadCpu"), "{err}");
    // CPU time: the sleep does not count, the call succeeds...
    let config = sleepy()
        .timeout(Some(limit))
        .timeout_clock(snapvm::vm::TimeoutClock::ThreadCpu);
    let mut vm = VmInstance::new(&config).unwrap();
    assert_eq!(vm.invoke("host_call", b"sleep\n").unwrap(), b"ok:");
    // ...while a guest that really runs that long still times out.
    let err = vm
        .invoke("infinite_loop", b"")
        .expect_err("CPU-time timeout");
    assert!(
        matches!(err, VmError::Timeout { clock: snapvm::vm::TimeoutClock::ThreadCpu, limit: l } if l == limit),
        "{err}"
    );
}

#[derive(Debug, Default)]
struct Tenant(Option<&'static str>);
#[derive(Debug)]
struct RequestId(u64);

#[test]
fn host_functions_see_the_call_context_and_user_data() {
    require_kvm!();
    let config = testguest()
        .timeout(Some(Duration::from_secs(5)))
        .data_type::<Tenant>()
        .host_function_with_caller("whoami", |caller, input| {
            let tenant = caller.data().0.unwrap_or("none");
            let request = caller.call_data::<RequestId>().map_or(0, |r| {
                r.0 += 1; // call data is the caller's to change
                r.0
            });
            assert!(caller.deadline().is_some());
            Ok(format!(
                "{tenant}/{request}/{}/{}/{}",
                caller.function(),
                caller.generation(),
                input.len()
            )
            .into_bytes())
        });
    let mut vm = VmInstance::new(&config).unwrap();
    let generation = vm.generation();
    let out = vm.invoke("host_call", b"whoami\nabc").unwrap();
    assert_eq!(
        out,
        format!("ok:none/0/host_call/{generation}/3").into_bytes()
    );
    vm.set_data(Tenant(Some("acme")));
    let mut request = RequestId(41);
    let out = vm
        .invoke_with("host_call", b"whoami\n", &mut request)
        .unwrap();
    assert_eq!(
        out,
        format!("ok:acme/42/host_call/{generation}/0").into_bytes()
    );
    assert_eq!(request.0, 42);
    assert_eq!(vm.data().0, Some("acme"));
}

#[cfg(feature = "serde")]
#[derive(serde::Serialize)]
struct Order {
    items: u32,
    price_cents: u64,
    note: String,
}

#[cfg(feature = "serde")]
#[derive(serde::Deserialize, Debug, PartialEq)]
struct Total {
    cents: u64,
    note_len: usize,
}

#[cfg(feature = "serde")]
#[test]
fn typed_calls_round_trip_and_fail_without_poisoning() {
    require_kvm!();
    let mut vm = VmInstance::new(&testguest()).unwrap();
    let order = Order {
        items: 3,
        price_cents: 250,
        note: "gift wrap".into(),
    };
    let total: Total = vm.call("total", &order).unwrap();
    assert_eq!(
        total,
        Total {
            cents: 750,
            note_len: 9
        }
    );
    // The guest's own error.
    let overflow = Order {
        items: 2,
        price_cents: u64::MAX,
        note: String::new(),
    };
    match vm.call::<_, Total>("total", &overflow) {
        Err(VmError::GuestError { code: 422, message }) => assert_eq!(message, "total overflows"),
        other => panic!("unexpected {other:?}"),
    }
    // An input the guest cannot decode: a bad request, not the guest's
    // own error, through every wrapper (`docs` of `ErrorKind`).
    match vm.call::<_, Total>("total", &7u8) {
        Err(e @ VmError::InputRejected { .. }) => {
            assert_eq!(e.kind(), snapvm::ErrorKind::BadRequest);
            assert!(!e.poisons());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        vm.invoke("total", &[0xFF; 3]),
        Err(VmError::InputRejected { .. })
    ));
    // An output that is not what the host expects.
    assert!(matches!(
        vm.call::<_, String>("total", &order),
        Err(VmError::Decode { .. })
    ));
    assert_eq!(vm.state(), VmState::Ready);
    let again: Total = vm.call("total", &order).unwrap();
    assert_eq!(again.cents, 750);
}

/// One classification across entry points: `invoke`, `ManagedVm::invoke`,
/// `restore` and `ShellPool::restore` errors all answer `kind()` and
/// `vm_error()`.
#[test]
fn every_entry_point_classifies_its_errors_the_same_way() {
    use snapvm::ErrorKind;
    require_kvm!();
    let config = testguest()
        .dirty_tracking(true)
        .timeout(Some(Duration::from_millis(50)));
    let mut vm = VmInstance::new(&config).unwrap();
    let ready = vm.snapshot().unwrap();
    let unknown = vm.invoke("nope", b"").unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::BadRequest);
    assert_eq!(
        vm.invoke("fallible", b"x").unwrap_err().kind(),
        ErrorKind::GuestError
    );
    assert_eq!(
        vm.invoke("infinite_loop", b"").unwrap_err().kind(),
        ErrorKind::Timeout
    );
    assert_eq!(
        vm.invoke("echo", b"").unwrap_err().kind(),
        ErrorKind::Poisoned
    );

    let mut managed = ManagedVm::new(vm, ready.clone(), policy::Always).unwrap();
    let crash = managed.invoke("panic", b"").unwrap_err();
    assert_eq!(crash.kind(), ErrorKind::GuestCrash);
    assert!(matches!(crash.vm_error(), Some(VmError::GuestPanic { .. })));

    let wrong = testguest().memory_size(128 << 20);
    let restore = VmInstance::restore(&wrong, &ready).unwrap_err();
    assert_eq!(restore.kind(), ErrorKind::Invalid);
    assert_eq!(snapvm::Error::from(restore).kind(), ErrorKind::Invalid);
    let pool = snapvm::snapshot::ShellPool::new(&config, 1).unwrap();
    let pooled = pool.restore_with(&wrong, &ready).unwrap_err();
    assert_eq!(pooled.kind(), ErrorKind::Invalid);
    assert!(matches!(
        pooled.vm_error(),
        Some(VmError::InvalidConfig { .. })
    ));
}

#[cfg(feature = "serde")]
#[test]
fn typed_host_functions_round_trip() {
    require_kvm!();
    let config =
        testguest().typed_host_function("host_total", |caller, (items, cents): (u32, u64)| {
            assert_eq!(caller.function(), "ask_host_total");
            Ok(u64::from(items) * cents)
        });
    let mut vm = VmInstance::new(&config).unwrap();
    let total: u64 = vm.call("ask_host_total", &(4u32, 25u64)).unwrap();
    assert_eq!(total, 100);
    // A host function registered for other types fails the guest's call.
    let config = testguest().typed_host_function("host_total", |_, s: String| Ok(s.len() as u64));
    let mut vm = VmInstance::new(&config).unwrap();
    match vm.call::<_, u64>("ask_host_total", &(4u32, 25u64)) {
        Err(VmError::GuestError { code: 1, .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Ready);
}

/// A `CancelToken` stops its own call, however early the cancel comes, and
/// never another: cancelled before the call starts, in the first
/// microseconds of the call, or while it runs, the call ends `Cancelled`
/// (never at its timeout); a token whose call ended stops nothing, not
/// even the call running on the same VM at that moment.
#[test]
fn a_cancel_token_stops_its_call_and_only_its_call() {
    require_kvm!();
    // A timeout, so that a lost cancel shows as `Timeout` instead of a hang.
    let config = testguest()
        .dirty_tracking(true)
        .timeout(Some(Duration::from_secs(10)));
    let mut vm = VmInstance::new(&config).unwrap();
    let ready = vm.snapshot().unwrap();

    // Before the call starts: no guest code runs, the VM is poisoned like
    // after any cancel.
    let early = snapvm::CancelToken::new();
    assert!(early.cancel());
    assert!(!early.cancel(), "a second cancel stops nothing new");
    assert!(matches!(
        vm.invoke_cancellable("echo", b"x", &early),
        Err(VmError::Cancelled)
    ));
    assert_eq!(vm.state(), VmState::Poisoned);
    vm.restore_in_place(&ready).unwrap();
    assert!(early.is_cancelled());
    assert!(matches!(
        vm.invoke_cancellable("echo", b"x", &early),
        Err(VmError::InvalidConfig {
            field: "cancel",
            ..
        })
    ));

    // Raced against the call's start: sent right after the call began,
    // before the guest can have been entered, many times.
    for round in 0..40 {
        let token = snapvm::CancelToken::new();
        let remote = token.clone();
        let go = Arc::new(std::sync::Barrier::new(2));
        let kicker = std::thread::spawn({
            let go = Arc::clone(&go);
            move || {
                go.wait();
                for _ in 0..(round % 8) * 50 {
                    std::hint::spin_loop();
                }
                remote.cancel()
            }
        });
        go.wait();
        let result = vm.invoke_cancellable("infinite_loop", b"", &token);
        assert!(
            kicker.join().unwrap(),
            "round {round}: the call had not ended"
        );
        assert!(token.is_cancelled(), "round {round}");
        assert!(
            matches!(result, Err(VmError::Cancelled)),
            "round {round}: {result:?}"
        );
        vm.restore_in_place(&ready).unwrap();
    }

    // A token whose call ended: refused for a second call, and its cancel
    // touches no other call, not even one running on this VM right now.
    let spent = snapvm::CancelToken::new();
    assert_eq!(vm.invoke_cancellable("echo", b"a", &spent).unwrap(), b"a");
    assert!(!spent.cancel());
    assert!(matches!(
        vm.invoke_cancellable("echo", b"b", &spent),
        Err(VmError::InvalidConfig {
            field: "cancel",
            ..
        })
    ));
    let mut short = VmInstance::restore(
        &config.clone().timeout(Some(Duration::from_millis(300))),
        &ready,
    )
    .unwrap();
    let stale = snapvm::CancelToken::new();
    assert_eq!(
        short.invoke_cancellable("echo", b"c", &stale).unwrap(),
        b"c"
    );
    let kicker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        stale.cancel()
    });
    let running = snapvm::CancelToken::new();
    let result = short.invoke_cancellable("infinite_loop", b"", &running);
    assert!(!kicker.join().unwrap(), "a spent token stopped nothing");
    assert!(
        matches!(result, Err(VmError::Timeout { .. })),
        "the running call ended at its own timeout: {result:?}"
    );

    // Through a ManagedVm: the cancelled call's VM is reset for the next.
    let mut managed = ManagedVm::new(vm, ready, policy::Never).unwrap();
    let token = snapvm::CancelToken::new();
    token.cancel();
    assert!(matches!(
        managed.invoke_cancellable("counter", b"", &token),
        Err(snapvm::Error::Vm(VmError::Cancelled))
    ));
    assert_eq!(managed.invoke("echo", b"next").unwrap(), b"next");
    assert_eq!(managed.resets(), 1);
}

/// Typed calls and call data work through every wrapper, with one
/// classification: `ManagedVm`, a pooled VM and `PollingVm`.
#[cfg(feature = "serde")]
#[test]
fn typed_calls_and_call_data_work_through_every_wrapper() {
    require_kvm!();
    let config =
        testguest()
            .dirty_tracking(true)
            .host_function_with_caller("whoami", |caller, _| {
                let request = caller.call_data::<RequestId>().map_or(0, |r| {
                    r.0 += 1;
                    r.0
                });
                Ok(format!("{}/{request}", caller.function()).into_bytes())
            });
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let order = Order {
        items: 2,
        price_cents: 100,
        note: "ab".into(),
    };
    let expected = Total {
        cents: 200,
        note_len: 2,
    };

    let vm = VmInstance::restore(&config, &ready).unwrap();
    let mut managed = ManagedVm::new(vm, ready.clone(), policy::Always).unwrap();
    assert_eq!(managed.call::<_, Total>("total", &order).unwrap(), expected);
    match managed.call::<_, Total>("total", &7u8) {
        Err(e @ snapvm::Error::Vm(VmError::InputRejected { .. })) => {
            assert_eq!(e.kind(), snapvm::ErrorKind::BadRequest)
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut request = RequestId(6);
    assert_eq!(
        managed
            .invoke_with("host_call", b"whoami\n", &mut request)
            .unwrap(),
        b"ok:host_call/7"
    );
    assert_eq!(request.0, 7);

    let pool = snapvm::ReadyPool::new(&config, ready.clone(), 1, || policy::Always).unwrap();
    assert_eq!(
        pool.get()
            .unwrap()
            .call::<_, Total>("total", &order)
            .unwrap(),
        expected
    );

    let vm = VmInstance::restore(&config, &ready).unwrap();
    let managed = ManagedVm::new(vm, ready, policy::Never).unwrap();
    let mut hot = policy::PollingVm::new(
        managed,
        policy::PollConfig::new().window(Duration::from_millis(200)),
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(hot.call::<_, Total>("total", &order).unwrap(), expected);
    }
}
