//! Every point where snapvm captures a vCPU and later runs it again: the
//! ready snapshot, a snapshot after a call, a diff, a file loaded again, a
//! pooled restore, a policy reset and a transaction rewind.
//!
//! Each capture happens at a hypercall exit. On VT-x and AMD-V, RIP is
//! still *at* that `out` until KVM completes it on the next `KVM_RUN`; a
//! capture that does not complete it first restores a guest that issues
//! the same hypercall again (`Ready` after init, a stale `Done` answering
//! the next call with the previous output, a second `TxBegin`). So every
//! test here checks that the first call after the restore really ran: it
//! gets an input no earlier call saw and must return what that input
//! asks for. `.ci/nested-svm.sh` runs these under nested `kvm_amd`.

mod common;

use snapvm::policy::{Always, ManagedVm, RetryPolicy, Transaction};
use snapvm::snapshot::{RestoreStrategy, ShellPool};
use snapvm::{ReadyPool, Snapshot, VmConfig, VmInstance, VmState};

fn config() -> VmConfig {
    common::config("testguest").dirty_tracking(true)
}

fn counter(vm: &mut VmInstance) -> u64 {
    u64::from_le_bytes(vm.invoke("counter", b"").unwrap().try_into().unwrap())
}

/// Calls `echo` with an input no other call used and checks that the
/// guest ran it (a replayed `Done` would return the previous output).
fn fresh_echo(vm: &mut VmInstance, tag: &str) {
    let input = format!("first call after {tag}: {:?}", std::time::Instant::now());
    assert_eq!(
        vm.invoke("echo", input.as_bytes()).unwrap(),
        input.as_bytes(),
        "{tag}"
    );
}

#[test]
fn the_ready_snapshot_serves_the_first_call_after_every_restore() {
    require_kvm!();
    let config = config();
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();
    for strategy in [RestoreStrategy::Eager, RestoreStrategy::Lazy] {
        let mut vm = VmInstance::restore_with(&config, &ready, strategy).unwrap();
        fresh_echo(&mut vm, "a restore of the ready snapshot");
        assert_eq!(counter(&mut vm), 1, "{strategy:?}");
        // In place, from a VM stopped at a `Done` exit.
        vm.restore_in_place(&ready).unwrap();
        fresh_echo(&mut vm, "a restore in place");
        assert_eq!(counter(&mut vm), 1, "{strategy:?}");
    }
}

#[test]
fn a_snapshot_taken_after_a_call_runs_the_next_call() {
    require_kvm!();
    let config = config();
    let mut vm = VmInstance::new(&config).unwrap();
    assert_eq!((counter(&mut vm), counter(&mut vm)), (1, 2));
    let snap = vm.snapshot().unwrap();
    // The original goes on from where the capture left it.
    fresh_echo(&mut vm, "a capture (the original)");
    let mut copy = VmInstance::restore(&config, &snap).unwrap();
    fresh_echo(&mut copy, "a capture after a call");
    assert_eq!(counter(&mut copy), 3);
    // A second snapshot of the copy, at its own `Done`.
    let again = copy.snapshot().unwrap();
    let mut third = VmInstance::restore(&config, &again).unwrap();
    assert_eq!(counter(&mut third), 4);
}

#[test]
fn a_diff_snapshot_runs_the_next_call() {
    require_kvm!();
    let config = config();
    let mut vm = VmInstance::new(&config).unwrap();
    let base = vm.snapshot().unwrap();
    counter(&mut vm);
    let diff = vm.snapshot_diff(&base).unwrap();
    counter(&mut vm);
    let diff2 = vm.snapshot_diff(&diff).unwrap();
    for (snap, next) in [(&diff, 2), (&diff2, 3)] {
        let mut copy = VmInstance::restore(&config, snap).unwrap();
        fresh_echo(&mut copy, "a diff restore");
        assert_eq!(counter(&mut copy), next);
    }
}

#[test]
fn a_snapshot_file_loaded_again_runs_the_next_call() {
    require_kvm!();
    let config = config();
    let mut vm = VmInstance::new(&config).unwrap();
    counter(&mut vm);
    let dir = std::env::temp_dir().join(format!("snapvm-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("after-call.snap");
    vm.snapshot().unwrap().save(&path).unwrap();
    drop(vm);
    let loaded = Snapshot::load(&path).unwrap();
    let mut copy = VmInstance::restore(&config, &loaded).unwrap();
    fresh_echo(&mut copy, "a file restore");
    assert_eq!(counter(&mut copy), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pooled_restores_and_policy_resets_run_the_next_call() {
    require_kvm!();
    let config = config();
    let ready = VmInstance::new(&config).unwrap().snapshot().unwrap();

    let shells = ShellPool::new(&config, 1).unwrap();
    let mut vm = shells.restore(&ready).unwrap();
    fresh_echo(&mut vm, "a pooled restore");
    assert_eq!(counter(&mut vm), 1);

    let mut managed = ManagedVm::new(vm, ready.clone(), Always).unwrap();
    for i in 0..4 {
        let input = format!("request {i}");
        assert_eq!(
            managed.invoke("echo", input.as_bytes()).unwrap(),
            input.as_bytes()
        );
        assert_eq!(managed.invoke("counter", b"").unwrap(), 1u64.to_le_bytes());
    }
    assert_eq!(managed.resets(), 8);

    let pool = ReadyPool::new(&config, ready, 1, || Always).unwrap();
    for i in 0..3 {
        let input = format!("pooled request {i}");
        let mut vm = pool.get().unwrap();
        assert_eq!(
            vm.invoke("echo", input.as_bytes()).unwrap(),
            input.as_bytes()
        );
    }
}

#[test]
fn a_rewound_transaction_runs_its_next_attempt() {
    require_kvm!();
    let config = common::config("txguest").dirty_tracking(true);
    let mut vm = VmInstance::new(&config).unwrap();
    let base = vm.snapshot().unwrap();
    // Fails twice, each attempt dirtying 4 pages, then commits: every
    // retry resumes right after `TxBegin`, which must not run again.
    let done = Transaction::new()
        .retry(RetryPolicy::default().max_attempts(5).no_backoff())
        .invoke(&mut vm, &base, "fail_times", &[2, 4])
        .unwrap();
    assert_eq!(done.attempts.len(), 3);
    assert_eq!(vm.state(), VmState::Ready);
    // And the VM serves an ordinary call after the rewinds.
    let out = vm.invoke("state", b"").unwrap();
    assert_eq!(u64::from_le_bytes(out[..8].try_into().unwrap()), 1);
}
