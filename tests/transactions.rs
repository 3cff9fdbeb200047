//! Transactions on real KVM: attempts judged by success criteria, retried
//! by rewinding the VM to `tx::begin`, with deferred and immediate host
//! calls, timeouts inside attempts, a buggy guest, and `ManagedVm`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapvm::policy::{
    Always, Committed, ManagedVm, NoTimeout, RestorePolicy, RetryPolicy, ReturnedOk,
    SuccessCriteria, Transaction, TxEnd, TxError, Verdict,
};
use snapvm::vm::TxFault;
use snapvm::{Snapshot, VmConfig, VmError, VmInstance, VmState};

fn config() -> VmConfig {
    common::config("txguest").dirty_tracking(true)
}

fn boot(config: &VmConfig) -> (VmInstance, Snapshot) {
    let mut vm = VmInstance::new(config).expect("txguest boots");
    let base = vm.snapshot().expect("ready snapshot");
    (vm, base)
}

/// `state()` of the guest: (log, preserved, before).
fn state(out: &[u8]) -> (Vec<u64>, u64, u64) {
    let words: Vec<u64> = out
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let len = words[0] as usize;
    (words[1..1 + len].to_vec(), words[1 + len], words[2 + len])
}

fn quick(attempts: u32) -> RetryPolicy {
    RetryPolicy::default().max_attempts(attempts).no_backoff()
}

#[test]
fn fails_k_times_then_succeeds_with_no_trace_of_failed_attempts() {
    require_kvm!();
    let (mut vm, base) = boot(&config());
    for k in [0u8, 1, 3] {
        vm.restore_in_place(&base).expect("reset");
        let tx = Transaction::new().retry(quick(10));
        // 16 pages dirtied per attempt, plus a heap allocation.
        let done = tx
            .invoke(&mut vm, &base, "fail_times", &[k, 16])
            .expect("succeeds");
        assert_eq!(done.attempts.len(), usize::from(k) + 1);
        let (log, _, before) = state(&done.output);
        // One append: the k failed attempts' appends were rewound.
        assert_eq!(log, [u64::from(k) + 1], "k = {k}");
        // Code before tx::begin ran once.
        assert_eq!(before, 1);
        for (i, attempt) in done.attempts.iter().enumerate() {
            assert_eq!(attempt.number as usize, i + 1);
            assert_eq!(attempt.rewind.is_some(), i > 0);
            if i < usize::from(k) {
                assert_eq!(
                    attempt.tx,
                    Some(TxEnd::Aborted(format!("conflict on attempt {}", i + 1)))
                );
                assert!(matches!(attempt.verdict, Verdict::Retry(_)));
            } else {
                assert_eq!(attempt.tx, Some(TxEnd::Committed));
                assert_eq!(attempt.verdict, Verdict::Success);
            }
        }
        // The memory itself shows one append, not just the output.
        let (log, _, _) = state(&vm.invoke("state", b"").expect("state"));
        assert_eq!(log, [u64::from(k) + 1]);
        assert_eq!(vm.state(), VmState::Ready);
    }
}

#[test]
fn exhausted_attempts_report_every_failure() {
    require_kvm!();
    let (mut vm, base) = boot(&config());
    let tx = Transaction::new().retry(quick(3));
    let err = tx
        .invoke(&mut vm, &base, "fail_times", &[5, 1])
        .unwrap_err();
    let TxError::RetriesExhausted { attempts } = &err else {
        panic!("{err}");
    };
    assert_eq!(attempts.len(), 3);
    for (i, a) in attempts.iter().enumerate() {
        let reason = format!("conflict on attempt {}", i + 1);
        assert_eq!(a.tx, Some(TxEnd::Aborted(reason.clone())));
        assert_eq!(a.verdict, Verdict::Retry(format!("aborted: {reason}")));
    }
    // The VM holds the last attempt's state and stays usable.
    let (log, _, _) = state(&vm.invoke("state", b"").expect("state"));
    assert_eq!(log, [3]);
}

#[test]
fn a_fatal_verdict_stops_at_once() {
    require_kvm!();
    let (mut vm, base) = boot(&config());
    let fatal_on_reason = |a: &snapvm::policy::AttemptInfo<'_>| match a.tx {
        Some(TxEnd::Aborted(r)) if r.starts_with("fatal") => Verdict::Fatal(r.clone()),
        _ => Verdict::Retry("no".into()),
    };
    let tx = Transaction::with_criteria(fatal_on_reason.and(Committed)).retry(quick(5));
    let err = tx.invoke(&mut vm, &base, "fatal", b"").unwrap_err();
    let TxError::Fatal { reason, attempts } = &err else {
        panic!("{err}");
    };
    assert_eq!(reason, "fatal: bad input");
    assert_eq!(attempts.len(), 1);
    assert!(matches!(
        attempts[0].error,
        Some(VmError::GuestError { code: 7, .. })
    ));
    // The default criteria retry the same attempt (a guest error is
    // retryable) until the attempts run out.
    vm.restore_in_place(&base).expect("reset");
    let err = Transaction::new()
        .retry(quick(2))
        .invoke(&mut vm, &base, "fatal", b"")
        .unwrap_err();
    assert!(matches!(err, TxError::RetriesExhausted { ref attempts } if attempts.len() == 2));
}

#[test]
fn a_timeout_inside_an_attempt_is_a_failed_attempt_and_the_vm_stays_usable() {
    require_kvm!();
    let config = config().timeout(Some(Duration::from_millis(300)));
    let (mut vm, base) = boot(&config);
    let tx = Transaction::with_criteria(NoTimeout.and(Committed)).retry(quick(3));
    let done = tx
        .invoke(&mut vm, &base, "timeout_once", b"")
        .expect("second attempt");
    assert_eq!(done.attempts.len(), 2);
    assert!(matches!(
        done.attempts[0].error,
        Some(VmError::Timeout { .. })
    ));
    assert_eq!(state(&done.output).0, [2]);
    assert_eq!(vm.state(), VmState::Ready);
    assert_eq!(
        vm.invoke("no_tx", b"still here").expect("usable"),
        b"still here"
    );
    // Without retries a timeout is the last failure.
    vm.restore_in_place(&base).expect("reset");
    let err = tx
        .clone()
        .retry(quick(1))
        .invoke(&mut vm, &base, "timeout_once", b"")
        .unwrap_err();
    assert!(
        matches!(err.vm_error(), Some(VmError::Timeout { .. })),
        "{err}"
    );
    assert_eq!(err.kind(), snapvm::ErrorKind::Timeout);
}

#[test]
fn protocol_violations_are_typed_errors() {
    require_kvm!();
    let (mut vm, base) = boot(&config());
    for (name, fault) in [
        ("nested", TxFault::Nested),
        ("commit_only", TxFault::EndWithoutBegin),
        ("unbalanced", TxFault::NotEnded),
        ("twice", TxFault::SecondTransaction),
    ] {
        vm.restore_in_place(&base).expect("reset");
        let err = Transaction::new()
            .retry(quick(5))
            .invoke(&mut vm, &base, name, b"")
            .unwrap_err();
        assert!(
            matches!(err, TxError::Fatal { ref attempts, .. } if attempts.len() == 1),
            "{name}: {err}"
        );
        assert!(
            matches!(err.vm_error(), Some(VmError::Transaction(f)) if *f == fault),
            "{name}: {err}"
        );
        // Without a runner, the same error.
        vm.restore_in_place(&base).expect("reset");
        let err = vm.invoke(name, b"").unwrap_err();
        assert!(
            matches!(err, VmError::Transaction(ref f) if *f == fault),
            "{name}: {err}"
        );
        assert_eq!(vm.state(), VmState::Poisoned);
    }
}

#[test]
fn without_a_runner_a_transaction_runs_once() {
    require_kvm!();
    let (mut vm, _) = boot(&config());
    let out = vm.invoke("fail_times", &[0, 1]).expect("plain call");
    assert_eq!(state(&out).0, [1]);
    // A function without a transaction under a runner: judged once.
    let (mut vm, base) = boot(&config());
    let err = Transaction::new()
        .invoke(&mut vm, &base, "no_tx", b"x")
        .unwrap_err();
    assert!(matches!(err, TxError::Fatal { .. }), "{err}");
    let done = Transaction::with_criteria(ReturnedOk)
        .invoke(&mut vm, &base, "no_tx", b"x")
        .expect("ok");
    assert_eq!(done.output, b"x");
}

/// A host-side store: `try` answers `ok` from attempt `ok_from` on and
/// counts its calls; `notify` (deferred) records what it was sent.
fn contended_config(ok_from: u64) -> (VmConfig, Arc<AtomicU64>, Arc<Mutex<Vec<u64>>>) {
    let tries = Arc::new(AtomicU64::new(0));
    let notes = Arc::new(Mutex::new(Vec::new()));
    let (t, n) = (Arc::clone(&tries), Arc::clone(&notes));
    let config = config()
        .host_function("try", move |input| {
            t.fetch_add(1, Ordering::SeqCst);
            let attempt = u64::from_le_bytes(input.try_into().map_err(|_| "bad input")?);
            Ok(if attempt >= ok_from {
                b"ok".to_vec()
            } else {
                b"no".to_vec()
            })
        })
        .deferred_host_function("notify", move |_caller, input| {
            let attempt = u64::from_le_bytes(input.try_into().map_err(|_| "bad input")?);
            n.lock().unwrap().push(attempt);
            Ok(b"ignored".to_vec())
        });
    (config, tries, notes)
}

#[test]
fn deferred_calls_are_delivered_once_on_success_and_immediate_ones_every_attempt() {
    require_kvm!();
    let (config, tries, notes) = contended_config(3);
    let (mut vm, base) = boot(&config);
    let done = Transaction::new()
        .retry(quick(5))
        .invoke(&mut vm, &base, "contended", b"")
        .expect("third attempt");
    assert_eq!(done.attempts.len(), 3);
    assert_eq!(tries.load(Ordering::SeqCst), 3, "immediate: every attempt");
    assert_eq!(*notes.lock().unwrap(), [3], "deferred: the successful one");
    assert_eq!(done.delivered, 1);
    assert!(done.delivery_failures.is_empty());
}

#[test]
fn deferred_calls_are_never_delivered_for_failed_transactions() {
    require_kvm!();
    let (config, tries, notes) = contended_config(u64::MAX);
    let (mut vm, base) = boot(&config);
    let err = Transaction::new()
        .retry(quick(4))
        .invoke(&mut vm, &base, "contended", b"")
        .unwrap_err();
    assert!(matches!(err, TxError::RetriesExhausted { .. }), "{err}");
    assert_eq!(tries.load(Ordering::SeqCst), 4);
    assert!(notes.lock().unwrap().is_empty());
    // Outside a runner a deferred function runs at once (the guest then
    // sees its real answer, not the empty one).
    vm.restore_in_place(&base).expect("reset");
    vm.invoke("contended", b"").expect("plain call");
    assert_eq!(*notes.lock().unwrap(), [1]);
}

#[test]
fn the_deadline_and_the_host_check_bound_retries() {
    require_kvm!();
    let (mut vm, base) = boot(&config());
    let tx = Transaction::new().retry(
        RetryPolicy::default()
            .max_attempts(1000)
            .backoff(Duration::from_millis(20), Duration::from_millis(20))
            .jitter(false)
            .deadline(Duration::from_millis(100)),
    );
    let err = tx
        .invoke(&mut vm, &base, "fail_times", &[200, 0])
        .unwrap_err();
    let TxError::DeadlineExceeded { attempts } = &err else {
        panic!("{err}");
    };
    assert!((2..=10).contains(&attempts.len()), "{}", attempts.len());
    // A host-side check: success only once external state allows it.
    vm.restore_in_place(&base).expect("reset");
    let checks = AtomicU64::new(0);
    let check = snapvm::policy::HostCheck(|| {
        if checks.fetch_add(1, Ordering::SeqCst) < 2 {
            Err("the row is locked".to_string())
        } else {
            Ok(())
        }
    });
    let done = Transaction::with_criteria(Committed.and(check))
        .retry(quick(5))
        .invoke(&mut vm, &base, "fail_times", &[0, 0])
        .expect("third attempt");
    assert_eq!(done.attempts.len(), 3);
    assert_eq!(
        done.attempts[0].verdict,
        Verdict::Retry("the row is locked".into())
    );
    assert_eq!(state(&done.output).0, [3]);
}

#[test]
fn works_in_a_managed_vm_with_preserved_regions() {
    require_kvm!();
    let config = config();
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let mut vm = ManagedVm::new(
        VmInstance::restore(&config, &ready).unwrap(),
        ready,
        Always.keeping_preserved(),
    )
    .expect("managed");
    let tx = Transaction::new().retry(quick(5));
    for round in 1..=3u64 {
        let done = vm
            .invoke_tx(&tx, "preserved_tx", &[2])
            .expect("third attempt");
        assert_eq!(done.attempts.len(), 3);
        let (log, preserved, _) = state(&done.output);
        assert_eq!(log, [3]);
        // Rewound with the rest of memory: one increment per success.
        assert_eq!(preserved, round);
        assert_eq!(vm.resets(), round, "one reset per transaction");
    }
    // After the reset: the log is gone, the preserved counter stays.
    let (log, preserved, _) = state(&vm.invoke("state", b"").expect("state"));
    assert!(log.is_empty());
    assert_eq!(preserved, 3);
    // A failed transaction poisons nothing; the next one runs.
    let err = vm.invoke_tx(&tx, "nested", b"").unwrap_err();
    assert!(matches!(
        err.vm_error(),
        Some(VmError::Transaction(TxFault::Nested))
    ));
    let done = vm
        .invoke_tx(&tx, "preserved_tx", &[0])
        .expect("after a fatal one");
    assert_eq!(state(&done.output).1, 4);
}

#[test]
fn a_vm_not_tracking_against_the_base_is_refused() {
    require_kvm!();
    let (mut vm, base) = boot(&config());
    let other = vm.snapshot().expect("another snapshot");
    let err = Transaction::new()
        .invoke(&mut vm, &base, "fail_times", &[0, 0])
        .unwrap_err();
    assert!(matches!(err, TxError::NotTracking { base: b } if b == base.id()));
    Transaction::new()
        .invoke(&mut vm, &other, "fail_times", &[0, 0])
        .expect("tracking against the newer snapshot");
}

/// A guest cannot make the host buffer deferred calls without bound: past
/// `MAX_DEFERRED_CALLS` calls or the host-call input limit in bytes, a
/// deferred call fails for the guest, and only the buffered ones are
/// delivered.
#[test]
fn deferred_calls_are_bounded_per_attempt() {
    require_kvm!();
    let delivered = Arc::new(AtomicU64::new(0));
    let d = Arc::clone(&delivered);
    let config = config()
        .host_call_limits(1000, 4096)
        .deferred_host_function("notify", move |_caller, _input| {
            d.fetch_add(1, Ordering::SeqCst);
            Ok(Vec::new())
        });
    let (mut vm, base) = boot(&config);
    let words = |out: &[u8]| {
        (
            u64::from_le_bytes(out[..8].try_into().unwrap()),
            u64::from_le_bytes(out[8..16].try_into().unwrap()),
        )
    };
    let tx = Transaction::with_criteria(Committed);
    // Bytes: 100-byte inputs against a 1000-byte budget.
    let done = tx
        .invoke(&mut vm, &base, "notify_many", &[20, 0, 100])
        .expect("commits");
    assert_eq!(words(&done.output), (10, 10));
    assert_eq!(done.delivered, 10);
    assert_eq!(delivered.load(Ordering::SeqCst), 10);
    // Count: empty inputs.
    vm.restore_in_place(&base).expect("reset");
    let calls = snapvm::policy::MAX_DEFERRED_CALLS as u16 + 50;
    let [lo, hi] = calls.to_le_bytes();
    let done = tx
        .invoke(&mut vm, &base, "notify_many", &[lo, hi, 0])
        .expect("commits");
    let max = snapvm::policy::MAX_DEFERRED_CALLS as u64;
    assert_eq!(words(&done.output), (max, 50));
    assert_eq!(delivered.load(Ordering::SeqCst), 10 + max);
}

/// A crash inside an attempt is fatal by default (a retry would repeat
/// it); a policy that retries it rewinds the VM out of the fault, and the
/// VM is usable afterwards.
#[test]
fn a_fault_inside_an_attempt_is_fatal_unless_the_policy_retries_it() {
    require_kvm!();
    let (mut vm, base) = boot(&config());
    let err = Transaction::new()
        .retry(quick(3))
        .invoke(&mut vm, &base, "fault_once", b"")
        .unwrap_err();
    assert!(
        matches!(err, TxError::Fatal { ref attempts, .. } if attempts.len() == 1),
        "{err}"
    );
    assert!(matches!(err.vm_error(), Some(VmError::GuestFault(f)) if f.is_null_dereference()));
    assert_eq!(vm.state(), VmState::Poisoned);
    vm.restore_in_place(&base).expect("reset");
    let done = Transaction::new()
        .retry(quick(3).retry_if(|_| true))
        .invoke(&mut vm, &base, "fault_once", b"")
        .expect("second attempt");
    assert_eq!(done.attempts.len(), 2);
    assert!(matches!(
        done.attempts[0].error,
        Some(VmError::GuestFault(_))
    ));
    assert_eq!(state(&done.output).0, [2]);
    assert_eq!(vm.state(), VmState::Ready);
    assert_eq!(vm.invoke("no_tx", b"ok").expect("usable"), b"ok");
}

/// The restore policy sees a transaction once, with every page it wrote.
#[test]
fn the_restore_policy_sees_the_transaction_once_with_its_pages() {
    require_kvm!();
    use snapvm::policy::{Decision, InvokeStats};
    let config = config();
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let policy = move |stats: &InvokeStats<'_>| {
        s.lock()
            .unwrap()
            .push((stats.pages_dirtied, stats.invocations_since_reset));
        Decision::Keep
    };
    let mut vm = ManagedVm::new(VmInstance::restore(&config, &ready).unwrap(), ready, policy)
        .expect("managed");
    let tx = Transaction::new().retry(quick(5));
    let done = vm
        .invoke_tx(&tx, "fail_times", &[2, 32])
        .expect("third attempt");
    assert_eq!(done.attempts.len(), 3);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one decision per transaction");
    assert!(seen[0].0 >= 32, "pages written: {}", seen[0].0);
    assert_eq!(seen[0].1, 1);
    assert_eq!(vm.resets(), 0);
}
