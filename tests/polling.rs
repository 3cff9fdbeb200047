//! Polling mode (`PollingVm`): warm calls without a VM exit, on real KVM —
//! results, policies, failures, a guest that will not stop spinning, and a
//! guest left idle.

mod common;

use std::time::{Duration, Instant};

use snapvm::policy::{Always, DirtyAbove, EveryN, ManagedVm, Never, PollConfig, PollingVm};
use snapvm::{Error, RestorePolicy, Snapshot, VmConfig, VmError, VmInstance};

/// The tests here measure this process's CPU time: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn setup() -> (VmConfig, Snapshot) {
    setup_with_timeout(Duration::from_millis(300))
}

fn setup_with_timeout(timeout: Duration) -> (VmConfig, Snapshot) {
    let config = common::config("testguest")
        .dirty_tracking(true)
        .timeout(Some(timeout));
    let ready = VmInstance::new(&config)
        .expect("testguest boots")
        .snapshot()
        .expect("ready snapshot");
    (config, ready)
}

fn polling<P: RestorePolicy>(policy: P, window: Duration) -> PollingVm<P> {
    let (config, ready) = setup();
    polling_from(&config, ready, policy, window)
}

fn polling_from<P: RestorePolicy>(
    config: &VmConfig,
    ready: Snapshot,
    policy: P,
    window: Duration,
) -> PollingVm<P> {
    let vm = VmInstance::restore(config, &ready).expect("restore");
    let managed = ManagedVm::new(vm, ready, policy).expect("managed");
    PollingVm::new(managed, PollConfig::new().window(window)).expect("polling")
}

fn counter(vm: &mut PollingVm<impl RestorePolicy>) -> u64 {
    let out = vm.invoke("counter", b"").expect("counter");
    u64::from_le_bytes(out.try_into().expect("8 bytes"))
}

fn vm_error(e: Error) -> VmError {
    match e {
        Error::Vm(e) => e,
        other => panic!("expected a VM error, got {other:?}"),
    }
}

/// Time-based asserts here are bounds: what the code promises plus a
/// tolerance for a loaded 2-core machine, where a thread can wait a long
/// time for a core. This is the tolerance for a stop the vCPU thread makes
/// (it must get a core to make it).
const STOP_TOLERANCE: Duration = Duration::from_millis(250);

/// Asserts that the guest still spins for the next call after a call that
/// began at `began`, as far as time can tell: the guest spins for `window`
/// after it answers, so it may have stopped by itself only once `window`
/// has passed since the call began (a loaded host can keep this thread off
/// its core that long). No other tolerance: stopping inside the window is
/// a bug.
fn assert_hot(vm: &PollingVm<impl RestorePolicy>, began: Instant, window: Duration, what: &str) {
    let hot = vm.is_hot();
    let since = began.elapsed();
    assert!(
        hot || since >= window,
        "{what}: the guest stopped {since:?} after the call began, inside its {window:?} window"
    );
}

/// Waits (5 s at most) until the guest stopped; returns how long that took.
fn time_until_stopped(vm: &PollingVm<impl RestorePolicy>) -> Duration {
    let waited = Instant::now();
    while vm.is_hot() && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = waited.elapsed();
    assert!(!vm.is_hot(), "still running after {took:?}");
    took
}

/// CPU time this process may use while its VMs are idle for
/// [`IDLE_PERIOD`]: a core kept busy would be charged all of it; a third
/// leaves room for the kernel's tick-based charging and the test's own
/// threads.
const IDLE_PERIOD: Duration = Duration::from_millis(300);
const IDLE_CPU: Duration = Duration::from_millis(100);

#[test]
fn hot_calls_return_each_output_and_keep_state() {
    require_kvm!();
    let _serial = serial();
    let window = Duration::from_millis(200);
    let mut vm = polling(Never, window);
    for i in 0..500u32 {
        let input = common::pseudo_random((i as usize * 37) % 3000, u64::from(i));
        assert_eq!(vm.invoke("echo", &input).expect("echo"), input, "call {i}");
    }
    // State persists between hot calls (policy `Never`).
    let first = counter(&mut vm);
    for k in 1..50 {
        assert_eq!(counter(&mut vm), first + k);
    }
    let began = Instant::now();
    assert_eq!(counter(&mut vm), first + 50);
    assert_hot(&vm, began, window, "between calls");
    assert_eq!(vm.resets(), 0);
    // Unknown functions and guest errors leave it hot and ready.
    assert!(matches!(
        vm_error(vm.invoke("nope", b"").unwrap_err()),
        VmError::UnknownFunction { .. }
    ));
    assert!(matches!(
        vm_error(vm.invoke("fallible", b"").unwrap_err()),
        VmError::GuestError { .. }
    ));
    // `fallible` counts too.
    assert_eq!(counter(&mut vm), first + 52);
}

#[test]
fn resets_follow_the_policy_with_the_guest_stopped() {
    require_kvm!();
    let _serial = serial();
    let mut every3 = polling(EveryN(3), Duration::from_millis(200));
    let seen: Vec<u64> = (0..9).map(|_| counter(&mut every3)).collect();
    assert_eq!(seen, [1, 2, 3, 1, 2, 3, 1, 2, 3]);
    assert_eq!(every3.resets(), 3);

    let mut always = polling(Always, Duration::from_millis(200));
    for _ in 0..20 {
        assert_eq!(
            counter(&mut always),
            1,
            "every call starts from the ready state"
        );
    }
    assert_eq!(always.resets(), 20);
}

#[test]
fn an_input_larger_than_the_buffer_grows_it_and_polling_goes_on() {
    require_kvm!();
    let _serial = serial();
    let window = Duration::from_millis(200);
    let mut vm = polling(Never, window);
    assert_eq!(vm.invoke("echo", b"small").expect("echo"), b"small");
    let big = common::pseudo_random(1 << 20, 7);
    assert_eq!(vm.invoke("echo", &big).expect("big echo"), big);
    let again = common::pseudo_random(900_000, 8);
    let began = Instant::now();
    assert_eq!(vm.invoke("echo", &again).expect("echo"), again);
    assert_hot(&vm, began, window, "after the grown buffer");
}

#[test]
fn faults_panics_and_timeouts_poison_then_the_next_call_is_clean() {
    require_kvm!();
    let _serial = serial();
    let window = Duration::from_millis(200);
    let mut vm = polling(Never, window);
    assert_eq!(counter(&mut vm), 1);
    assert_eq!(counter(&mut vm), 2);
    let e = vm_error(vm.invoke("panic", b"").unwrap_err());
    assert!(matches!(e, VmError::GuestPanic { .. }), "{e:?}");
    // The poisoned VM was reset to the ready state.
    assert_eq!(counter(&mut vm), 1);
    let e = vm_error(vm.invoke("null_deref", b"").unwrap_err());
    assert!(matches!(e, VmError::GuestFault(_)), "{e:?}");
    assert_eq!(counter(&mut vm), 1);
    // A forged result (output past the end of memory) from a guest that
    // then ignores the stop request: refused, the guest stopped by force.
    let e = vm_error(vm.invoke("poll_forge_result", b"").unwrap_err());
    assert!(
        matches!(e, VmError::BadHypercall { .. }),
        "refused as a malformed result: {e:?}"
    );
    assert_eq!(counter(&mut vm), 1);

    let start = Instant::now();
    let e = vm_error(vm.invoke("infinite_loop", b"").unwrap_err());
    let took = start.elapsed();
    assert!(matches!(e, VmError::Timeout { .. }), "{e:?}");
    assert!(
        took < Duration::from_millis(300) + TIMEOUT_LATE,
        "returned {took:?} after the call began, the deadline is 300 ms"
    );
    let began = Instant::now();
    assert_eq!(counter(&mut vm), 1);
    assert_eq!(vm.resets(), 4);
    assert_hot(&vm, began, window, "after the resets");
}

#[test]
fn a_guest_that_never_stops_spinning_is_stopped_poisoned_and_reset() {
    require_kvm!();
    let _serial = serial();
    let window = Duration::from_millis(1);
    let mut vm = polling(Never, window);
    assert_eq!(counter(&mut vm), 1);
    // Returns normally, then the runtime spins with a window of forever.
    assert_eq!(
        vm.invoke("poll_spin_forever", b"").expect("returns"),
        b"spinning"
    );
    // The vCPU thread stops it 50 ms past the 1 ms window.
    let took = time_until_stopped(&vm);
    let promised = window + Duration::from_millis(50);
    assert!(
        took < promised + STOP_TOLERANCE,
        "the host stopped the spinning guest after {took:?}, promised {promised:?}"
    );
    let cpu = common::process_cpu();
    std::thread::sleep(IDLE_PERIOD);
    let burnt = common::process_cpu() - cpu;
    assert!(burnt < IDLE_CPU, "no core kept busy: {burnt:?}");
    // The overrun poisoned it: the next call runs on a reset VM.
    assert_eq!(counter(&mut vm), 1);
    assert_eq!(vm.resets(), 1);
}

#[test]
fn an_idle_guest_stops_after_its_window_and_wakes_for_the_next_call() {
    require_kvm!();
    let _serial = serial();
    let window = Duration::from_millis(2);
    let mut vm = polling(Never, window);
    assert_eq!(counter(&mut vm), 1);
    let took = time_until_stopped(&vm);
    assert!(
        took < window + STOP_TOLERANCE,
        "the guest stopped by itself after its window: {took:?}"
    );
    let cpu = common::process_cpu();
    std::thread::sleep(IDLE_PERIOD);
    let burnt = common::process_cpu() - cpu;
    assert!(burnt < IDLE_CPU, "idle VM burns no core: {burnt:?}");
    // Not poisoned: state survives the stop.
    let began = Instant::now();
    assert_eq!(counter(&mut vm), 2);
    assert_eq!(vm.resets(), 0);
    assert_hot(&vm, began, window, "woken by the call");
}

#[test]
fn into_managed_and_drop_stop_the_guest() {
    require_kvm!();
    let _serial = serial();
    let threads = || {
        std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .filter(|t| {
                let comm = t.as_ref().expect("task").path().join("comm");
                std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == "snapvm-vcpu")
            })
            .count()
    };
    let window = Duration::from_secs(1);
    let mut vm = polling(Never, window);
    let began = Instant::now();
    assert_eq!(counter(&mut vm), 1);
    assert_hot(&vm, began, window, "before into_managed");
    let mut managed = vm.into_managed();
    // The ordinary path again, with the state kept.
    let out = managed.invoke("counter", b"").expect("counter");
    assert_eq!(u64::from_le_bytes(out.try_into().expect("8 bytes")), 2);

    let mut hot = PollingVm::new(managed, PollConfig::new()).expect("polling again");
    assert_eq!(counter(&mut hot), 3);
    assert!(threads() >= 1);
    drop(hot);
    // No vCPU thread of this test is left (other tests run in parallel
    // threads of this process, so count only down to what they may hold).
    let mut vm = polling(Never, Duration::from_secs(1));
    assert_eq!(counter(&mut vm), 1);
    drop(vm);
}

#[test]
fn policies_that_read_the_dirty_log_and_bad_windows_are_refused() {
    require_kvm!();
    let _serial = serial();
    let (config, ready) = setup();
    let managed = |policy| {
        ManagedVm::new(
            VmInstance::restore(&config, &ready).expect("restore"),
            ready.clone(),
            policy,
        )
        .expect("managed")
    };
    let e = PollingVm::new(managed(DirtyAbove(1 << 20)), PollConfig::new()).unwrap_err();
    assert!(
        matches!(
            vm_error(e),
            VmError::InvalidConfig {
                field: "policy",
                ..
            }
        ),
        "DirtyAbove reads dirty pages"
    );
    let managed = ManagedVm::new(
        VmInstance::restore(&config, &ready).expect("restore"),
        ready.clone(),
        Never,
    )
    .expect("managed");
    let e = PollingVm::new(managed, PollConfig::new().window(Duration::from_secs(5))).unwrap_err();
    assert!(matches!(
        vm_error(e),
        VmError::InvalidConfig {
            field: "window",
            ..
        }
    ));
}

/// Resets after polled calls return every page to the snapshot: the guest's
/// writes (seen by KVM's dirty log while the guest ran on the vCPU thread)
/// and the host's (inputs written into the guest's buffer while it ran).
#[test]
fn resets_after_polled_calls_match_a_never_used_vm() {
    require_kvm!();
    let _serial = serial();
    // This test is about memory, not time: a generous timeout, so that a
    // slow host (nested virtualization under emulation) cannot fail it.
    let (config, ready) = setup_with_timeout(Duration::from_secs(10));
    let reference = VmInstance::restore(&config, &ready).expect("restore");
    let mut vm = polling_from(&config, ready, Never, Duration::from_millis(50));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..12u8 {
        for _ in 0..40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let byte = (x >> 8) as u8;
            match x % 4 {
                0 => vm.invoke("write_pages", &[(x % 40) as u8, byte]).map(drop),
                // Inputs that fit the guest's first input buffer: pages
                // only the host writes, while the guest runs.
                1 => vm
                    .invoke("echo", &vec![byte; (x % 60_000) as usize])
                    .map(drop),
                2 if x % 16 == 2 => vm.invoke("echo", &vec![byte; 200_000]).map(drop),
                _ => vm.invoke("leak_kib", &[byte, 0]).map(drop),
            }
            .expect("call");
        }
        // Writes all over the heap: last before the reset.
        let began = Instant::now();
        vm.invoke("scribble", &[round]).expect("scribble");
        if round > 0 {
            assert_hot(&vm, began, Duration::from_millis(50), "after scribble");
        }
        vm.reset().expect("reset");
        let managed = vm.into_managed();
        common::compare_with_ready(managed.vm(), &reference);
        vm = PollingVm::new(managed, PollConfig::new().window(Duration::from_millis(50)))
            .expect("polling again");
    }
}

/// A polling VM moves between threads like any VM (an executor's worker
/// owns it).
#[test]
fn a_polling_vm_is_send() {
    fn send<T: Send>() {}
    send::<PollingVm<Never>>();
    send::<PollingVm<Box<dyn RestorePolicy>>>();
}

/// `Idle` and `Done` made in the middle of a call stop nothing: outside
/// polling mode `Idle` resumes the guest; in polling mode neither ends the
/// call the host waits for, which returns the function's own output, and
/// the next call sees the VM as the call left it.
#[test]
fn stray_idle_and_done_hypercalls_end_no_call() {
    require_kvm!();
    let _serial = serial();
    let (config, ready) = setup();
    let mut ordinary = ManagedVm::new(
        VmInstance::restore(&config, &ready).expect("restore"),
        ready.clone(),
        Never,
    )
    .expect("managed");
    assert_eq!(
        ordinary.invoke("stray_idle", b"").expect("idle"),
        b"resumed"
    );
    let out = ordinary.invoke("counter", b"").expect("counter");
    assert_eq!(u64::from_le_bytes(out.try_into().expect("8 bytes")), 1);

    let window = Duration::from_millis(200);
    let mut vm = polling_from(&config, ready, Never, window);
    assert_eq!(counter(&mut vm), 1);
    assert_eq!(vm.invoke("stray_idle", b"").expect("idle"), b"resumed");
    assert_eq!(vm.invoke("stray_done", b"").expect("done"), b"resumed");
    let began = Instant::now();
    assert_eq!(counter(&mut vm), 2);
    assert_eq!(vm.resets(), 0);
    assert_hot(&vm, began, window, "after stray stops");
}

/// Call bookkeeping runs for polled calls as for calls through exits: a
/// transaction per call works on every polled call, after an ordinary call
/// that used one, and a call that leaves its transaction open fails
/// (`NotEnded`) and leaves nothing behind for the next request.
#[test]
fn every_polled_call_starts_with_fresh_transaction_state() {
    require_kvm!();
    let _serial = serial();
    let config = common::config("txguest")
        .dirty_tracking(true)
        .timeout(Some(Duration::from_secs(2)));
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let vm = VmInstance::restore(&config, &ready).unwrap();
    let mut managed = ManagedVm::new(vm, ready.clone(), Never).unwrap();
    // An ordinary call with a transaction first.
    assert_eq!(managed.invoke("one_tx", b"").unwrap(), b"committed");
    let window = Duration::from_millis(500);
    let mut hot = PollingVm::new(managed, PollConfig::new().window(window)).expect("polling");
    for i in 0..3 {
        assert_eq!(hot.invoke("one_tx", b"").unwrap(), b"committed", "call {i}");
    }
    let began = Instant::now();
    assert_eq!(hot.invoke("one_tx", b"").unwrap(), b"committed", "call 3");
    assert_hot(&hot, began, window, "after transactions");

    let mut always = polling_from(&config, ready, Always, Duration::from_millis(500));
    assert_eq!(always.invoke("one_tx", b"").unwrap(), b"committed");
    match always.invoke("unbalanced", b"").map_err(vm_error) {
        Err(VmError::Transaction(snapvm::vm::TxFault::NotEnded)) => {}
        other => panic!("a transaction left open must fail, got {other:?}"),
    }
    for i in 0..3 {
        assert_eq!(
            always.invoke("one_tx", b"").unwrap(),
            b"committed",
            "request {i}"
        );
    }
}

/// A host function serving a polled call sees that call: its function
/// name and its deadline (the VM has a timeout).
#[test]
fn host_functions_see_the_polled_call() {
    require_kvm!();
    let _serial = serial();
    let config = common::config("testguest")
        .dirty_tracking(true)
        .timeout(Some(Duration::from_secs(2)))
        .host_function_with_caller("whoami", |caller, _| {
            Ok(format!("{}/{}", caller.function(), caller.deadline().is_some()).into_bytes())
        });
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let vm = VmInstance::restore(&config, &ready).unwrap();
    let mut managed = ManagedVm::new(vm, ready, Never).unwrap();
    assert_eq!(managed.invoke("echo", b"x").unwrap(), b"x");
    let mut hot = PollingVm::new(
        managed,
        PollConfig::new().window(Duration::from_millis(500)),
    )
    .expect("polling");
    for _ in 0..3 {
        assert_eq!(
            hot.invoke("host_call", b"whoami\n").unwrap(),
            b"ok:host_call/true"
        );
        assert_eq!(hot.invoke("echo", b"y").unwrap(), b"y");
    }
}

/// A guest that answers its call and then keeps calling a host function
/// (every call an exit, none a stop) is stopped like one that spins: the
/// promise is 50 ms past its window; checked with [`STOP_TOLERANCE`].
#[test]
fn a_guest_looping_on_host_calls_after_its_answer_is_stopped() {
    require_kvm!();
    let _serial = serial();
    let (config, ready) = setup();
    // The host function takes most of the time: a stop signal that lands
    // while it runs must not be lost.
    let config = config.host_function("noop", |_| {
        std::thread::sleep(Duration::from_millis(1));
        Ok(Vec::new())
    });
    let mut vm = polling_from(&config, ready, Never, Duration::from_millis(1));
    assert_eq!(counter(&mut vm), 1);
    assert_eq!(vm.invoke("poll_host_loop", b"").expect("answers"), b"");
    let took = time_until_stopped(&vm);
    let promised = Duration::from_millis(1 + 50);
    assert!(
        took < promised + STOP_TOLERANCE,
        "stopped after {took:?}, promised {promised:?}"
    );
    // It overran: the next call runs on a reset VM.
    assert_eq!(counter(&mut vm), 1);
    assert_eq!(vm.resets(), 1);
}

/// A `CancelToken` stops its own polled call however early it comes, and
/// a token whose call ended stops nothing (not the next call either).
#[test]
fn a_cancel_token_stops_its_polled_call_and_only_that_one() {
    require_kvm!();
    let _serial = serial();
    // The VM's timeout is 300 ms: a lost cancel shows as `Timeout`. A
    // cancel lands within milliseconds; the rest is tolerance for the
    // cancelling thread's wait for a core on a loaded machine.
    let mut vm = polling(Never, Duration::from_millis(500));
    assert_eq!(counter(&mut vm), 1);

    let early = snapvm::CancelToken::new();
    assert!(early.cancel());
    let err = vm_error(vm.invoke_cancellable("counter", b"", &early).unwrap_err());
    assert!(matches!(err, VmError::Cancelled), "{err:?}");
    // Poisoned, so reset: the counter starts again.
    assert_eq!(counter(&mut vm), 1);

    for round in 0..20 {
        let token = snapvm::CancelToken::new();
        let remote = token.clone();
        let go = std::sync::Arc::new(std::sync::Barrier::new(2));
        let kicker = std::thread::spawn({
            let go = std::sync::Arc::clone(&go);
            move || {
                go.wait();
                if round % 2 == 1 {
                    std::thread::sleep(Duration::from_millis(20));
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
        match result.map_err(vm_error) {
            Err(VmError::Cancelled) => {}
            other => panic!("round {round}: {other:?}"),
        }
    }

    // A spent token: its cancel during the next call stops nothing.
    let spent = snapvm::CancelToken::new();
    assert_eq!(vm.invoke_cancellable("echo", b"a", &spent).unwrap(), b"a");
    let kicker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        spent.cancel()
    });
    let err = vm_error(vm.invoke("infinite_loop", b"").unwrap_err());
    assert!(!kicker.join().unwrap());
    assert!(matches!(err, VmError::Timeout { .. }), "{err:?}");
    assert_eq!(counter(&mut vm), 1);
}

/// A request's call data: the host function `request_id` counts it up.
#[derive(Debug)]
struct RequestId(u64);

/// `PollingVm::invoke_with` runs on the caller's thread (call data is
/// borrowed there) and keeps the policy's state; plain calls after it are
/// hot again and see no call data.
#[test]
fn call_data_reaches_host_functions_and_the_guest_goes_hot_again() {
    require_kvm!();
    let _serial = serial();
    let (config, ready) = setup();
    let config = config.host_function_with_caller("request_id", |caller, _| {
        let Some(request) = caller.call_data::<RequestId>() else {
            return Ok(b"none".to_vec());
        };
        request.0 += 1;
        Ok(request.0.to_string().into_bytes())
    });
    let window = Duration::from_millis(300);
    let mut vm = polling_from(&config, ready, Never, window);
    let mut count = counter(&mut vm);
    assert_eq!(count, 1);
    for round in 1..=3u64 {
        let resets = vm.resets();
        let mut request = RequestId(round * 100);
        let out = vm
            .invoke_with("host_call", b"request_id\n", &mut request)
            .unwrap();
        assert_eq!(out, format!("ok:{}", round * 100 + 1).into_bytes());
        assert_eq!(request.0, round * 100 + 1);
        // The guest's state is kept between the two kinds of call (policy
        // `Never`): the counter goes on — unless the hot guest did not stop
        // within its grace (a loaded host) and was stopped by force, which
        // resets it, as any stop by force does.
        let began = Instant::now();
        let next = counter(&mut vm);
        match vm.resets() - resets {
            0 => assert_eq!(next, count + 1, "round {round}"),
            _ => assert_eq!(next, 1, "round {round}"),
        }
        count = next;
        assert_hot(&vm, began, window, &format!("round {round}: a plain call"));
        assert_eq!(vm.invoke("host_call", b"request_id\n").unwrap(), b"ok:none");
    }
    // Call data also reaches a call whose input grows the guest's buffer.
    let mut request = RequestId(7);
    let mut big = b"request_id\n".to_vec();
    big.resize(1 << 20, b'x');
    assert_eq!(
        vm.invoke_with("host_call", &big, &mut request).unwrap(),
        b"ok:8"
    );
    assert_eq!(request.0, 8);
}

/// How late a timed-out polled call may return: the promised 20 ms for the
/// kicked vCPU thread to give the VM back, plus 80 ms of tolerance for this
/// thread's own wait for a core on a loaded 2-core machine (measured: at
/// most 40 ms late in 120 calls with four busy threads and load average 7).
const TIMEOUT_LATE: Duration = Duration::from_millis(100);

/// Busy threads that keep every core of this machine (2 on the
/// development machines) oversubscribed until dropped: a loaded host.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(threads: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A polled call into a guest that never answers returns `Timeout` soon
/// after its deadline even with every core oversubscribed: the caller
/// reads the clock at every look, waits for the kicked vCPU thread at most
/// 20 ms, and leaves the reset to the next call (`docs/executor.md`).
#[test]
fn a_timed_out_polled_call_returns_soon_after_its_deadline_under_load() {
    require_kvm!();
    let _serial = serial();
    let deadline = Duration::from_millis(200);
    let config = common::config("testguest")
        .dirty_tracking(true)
        .timeout(Some(deadline));
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let mut vm = polling_from(&config, ready, Never, Duration::from_millis(5));
    // Two busy threads per core of the 2-core machines this runs on.
    let _load = Load::start(4);
    for round in 0..10 {
        assert_eq!(counter(&mut vm), 1, "round {round}: reset before this call");
        let resets = vm.resets();
        let started = Instant::now();
        let e = vm_error(vm.invoke("infinite_loop", b"").unwrap_err());
        let took = started.elapsed();
        assert!(matches!(e, VmError::Timeout { .. }), "round {round}: {e:?}");
        assert!(took >= deadline, "round {round}: early, {took:?}");
        assert!(
            took < deadline + TIMEOUT_LATE,
            "round {round}: returned {:?} past its deadline",
            took - deadline
        );
        assert_eq!(vm.resets(), resets, "round {round}: reset inside the call");
    }
}

/// A polled call whose guest sits in a slow host function at its deadline
/// returns on time too: a kick cannot stop host code, so the call does not
/// wait for it (at most 20 ms) and the VM stays with the vCPU thread until
/// the host function returns; the next call takes it back and resets it.
#[test]
fn a_timed_out_polled_call_does_not_wait_for_a_slow_host_function() {
    require_kvm!();
    let _serial = serial();
    let deadline = Duration::from_millis(200);
    let config = common::config("testguest")
        .dirty_tracking(true)
        .timeout(Some(deadline))
        .host_function("slow", |_| {
            std::thread::sleep(Duration::from_millis(1500));
            Ok(Vec::new())
        });
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let mut vm = polling_from(&config, ready, Never, Duration::from_millis(5));
    assert_eq!(counter(&mut vm), 1);
    let started = Instant::now();
    let e = vm_error(vm.invoke("host_call", b"slow\n").unwrap_err());
    let took = started.elapsed();
    assert!(matches!(e, VmError::Timeout { .. }), "{e:?}");
    assert!(
        took < deadline + TIMEOUT_LATE,
        "returned {:?} past its deadline",
        took - deadline
    );
    // The next call runs on a reset VM, once the host function is done.
    assert_eq!(counter(&mut vm), 1);
    assert_eq!(vm.resets(), 1);
    assert!(started.elapsed() >= Duration::from_millis(1500));
}
