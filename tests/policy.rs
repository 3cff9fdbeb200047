//! Restore policies and resets on real KVM: isolation, garbage collection
//! by restore, preserved state, the scratch disk, hostile guests.

mod common;

use snapvm::policy::{
    Always, Decision, DirtyAbove, EveryN, GuestGarbageAbove, InvokeStats, ManagedVm, Never,
    OnError, RestorePolicy,
};
use snapvm::vm::ScratchDisk;
use snapvm::{ReadyPool, Snapshot, VmConfig, VmError, VmInstance};

fn config() -> VmConfig {
    common::config("testguest").dirty_tracking(true)
}

fn ready(config: &VmConfig) -> Snapshot {
    VmInstance::new(config).unwrap().snapshot().unwrap()
}

fn managed<P: RestorePolicy>(config: &VmConfig, policy: P) -> ManagedVm<P> {
    let ready = ready(config);
    let vm = VmInstance::restore(config, &ready).unwrap();
    ManagedVm::new(vm, ready, policy).unwrap()
}

fn words(out: &[u8]) -> Vec<u64> {
    out.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn always_gives_every_request_the_ready_state() {
    require_kvm!();
    let config = config().scratch_disk(ScratchDisk::from_bytes(b"ready disk".to_vec()));
    let mut vm = managed(&config, Always);
    for _ in 0..5 {
        // The ordinary counter is back at its ready value every time.
        assert_eq!(words(&vm.invoke("counter", b"").unwrap()), [1]);
        // So is the scratch disk.
        assert_eq!(vm.invoke("disk_read", &[10]).unwrap(), b"ready disk");
        assert_eq!(vm.invoke("disk_write", b"scribbled!").unwrap(), [1]);
        assert_eq!(vm.invoke("disk_read", &[10]).unwrap(), b"ready disk");
    }
    assert_eq!(vm.resets(), 20);
}

#[test]
fn never_and_every_n_keep_state_between_resets() {
    require_kvm!();
    let config = config();
    let mut kept = managed(&config, Never);
    for expected in 1..=5u64 {
        assert_eq!(words(&kept.invoke("counter", b"").unwrap()), [expected]);
    }
    let mut every3 = managed(&config, EveryN(3));
    let seen: Vec<u64> = (0..7)
        .map(|_| words(&every3.invoke("counter", b"").unwrap())[0])
        .collect();
    assert_eq!(seen, [1, 2, 3, 1, 2, 3, 1]);
}

#[test]
fn combinators_and_closures_are_policies() {
    require_kvm!();
    let config = config();
    let mut vm = managed(&config, EveryN(100).or(OnError));
    assert_eq!(words(&vm.invoke("counter", b"").unwrap()), [1]);
    assert_eq!(words(&vm.invoke("counter", b"").unwrap()), [2]);
    assert!(vm.invoke("no_such_function", b"").is_err());
    assert_eq!(
        words(&vm.invoke("counter", b"").unwrap()),
        [1],
        "reset after the failed call"
    );

    let only_after_echo = |s: &InvokeStats<'_>| {
        if s.function == "echo" {
            Decision::Reset
        } else {
            Decision::Keep
        }
    };
    let mut vm = managed(&config, only_after_echo);
    vm.invoke("counter", b"").unwrap();
    assert_eq!(words(&vm.invoke("counter", b"").unwrap()), [2]);
    vm.invoke("echo", b"x").unwrap();
    assert_eq!(words(&vm.invoke("counter", b"").unwrap()), [1]);

    let mut dirty = managed(&config, DirtyAbove(64 * 4096));
    dirty.invoke("write_pages", &[16, 1]).unwrap();
    assert_eq!(dirty.resets(), 0);
    dirty.invoke("write_pages", &[100, 1]).unwrap();
    assert_eq!(dirty.resets(), 1);
}

#[test]
fn a_poisoned_vm_is_always_reset() {
    require_kvm!();
    let config = config();
    let mut vm = managed(&config, Never);
    vm.invoke("counter", b"").unwrap();
    assert!(matches!(
        vm.invoke("panic", b""),
        Err(snapvm::Error::Vm(VmError::GuestPanic { .. }))
    ));
    assert_eq!(vm.vm().state(), snapvm::VmState::Ready);
    assert_eq!(words(&vm.invoke("counter", b"").unwrap()), [1]);
}

#[test]
fn a_leaking_guest_runs_100k_requests_under_garbage_policy() {
    require_kvm!();
    let config = config();
    let mut vm = managed(&config, GuestGarbageAbove(8 << 20));
    for i in 0..100_000u32 {
        vm.invoke("leak_kib", &[1])
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    // 100,000 KiB leaked in a 64 MiB guest: only resets made it possible.
    assert!(vm.resets() >= 10, "{} resets", vm.resets());
}

#[test]
fn without_a_policy_the_leaking_guest_runs_out_of_memory() {
    require_kvm!();
    let mut vm = VmInstance::new(&config()).unwrap();
    let err = (0..200_000)
        .find_map(|_| vm.invoke("leak_kib", &[64]).err())
        .expect("the guest must run out of memory");
    assert!(matches!(err, VmError::GuestOutOfMemory { .. }), "{err:?}");
}

#[test]
fn guest_reported_garbage_drives_the_policy() {
    require_kvm!();
    let mut vm = managed(&config(), GuestGarbageAbove(10 << 20));
    vm.invoke("report_garbage", &[5]).unwrap();
    assert_eq!(vm.resets(), 0);
    vm.invoke("report_garbage", &[20]).unwrap();
    assert_eq!(vm.resets(), 1);
}

#[test]
fn a_preserved_counter_survives_1000_resets() {
    require_kvm!();
    let mut vm = managed(&config(), Always.keeping_preserved());
    for i in 1..=1000u64 {
        // Preserved counter keeps counting; the ordinary one restarts.
        assert_eq!(words(&vm.invoke("bump", b"").unwrap()), [i, 1]);
    }
    assert_eq!(vm.resets(), 1000);
    assert_eq!(vm.vm().preserved_regions().len(), 1);
    // Under other policies preserved regions are kept without asking.
    let mut every2 = managed(&config(), EveryN(2));
    let seen: Vec<Vec<u64>> = (0..4)
        .map(|_| words(&every2.invoke("bump", b"").unwrap()))
        .collect();
    assert_eq!(seen, [[1, 1], [2, 2], [3, 1], [4, 2]]);
}

/// Under `Always` nothing a request wrote reaches the next request, not
/// even through a region the guest preserved (at init or in the middle of
/// a request) — unless the host declared it with `keeping_preserved`.
#[test]
fn always_lets_no_preserved_bytes_cross_requests_unless_declared() {
    require_kvm!();
    let config = config();
    let secret = b"request A's input: card 4111 1111 1111 1111";
    for policy in [
        Box::new(Always) as Box<dyn RestorePolicy>,
        Box::new(Always.or(Never)),
        Box::new(OnError.or(Always)),
    ] {
        let mut vm = managed(&config, policy);
        assert_eq!(
            vm.invoke("stash", secret).unwrap(),
            [0],
            "preserve accepted"
        );
        assert_eq!(vm.invoke("unstash", b"").unwrap(), b"", "request B");
        // The counter preserved at init restarts too.
        assert_eq!(words(&vm.invoke("bump", b"").unwrap()), [1, 1]);
        assert_eq!(words(&vm.invoke("bump", b"").unwrap()), [1, 1]);
        assert_eq!(vm.vm().preserved_regions().len(), 1);
    }
    // Declared: the bytes cross, as asked.
    let mut declared = managed(&config, Always.keeping_preserved());
    assert_eq!(declared.invoke("stash", secret).unwrap(), [0]);
    assert_eq!(declared.invoke("unstash", b"").unwrap(), secret);
    // A pool of `Always` VMs isolates the same way.
    let pool = ReadyPool::new(&config, ready(&config), 1, || Always).unwrap();
    assert_eq!(pool.get().unwrap().invoke("stash", secret).unwrap(), [0]);
    assert_eq!(pool.get().unwrap().invoke("unstash", b"").unwrap(), b"");
}

#[test]
fn bad_preserved_regions_are_refused_with_typed_errors() {
    require_kvm!();
    let mut vm = VmInstance::new(&config().max_preserved(1 << 20)).unwrap();
    // outside memory, the ABI page, larger than memory, over the limit
    assert_eq!(vm.invoke("preserve_bad", b"").unwrap(), [1, 1, 1, 2]);
    assert_eq!(vm.preserved_regions().len(), 1);
}

#[test]
fn hostile_writes_all_over_memory_are_fully_reset() {
    require_kvm!();
    let config = config();
    let ready = ready(&config);
    let reference = VmInstance::restore(&config, &ready).unwrap();
    let mut vm = ManagedVm::new(
        VmInstance::restore(&config, &ready).unwrap(),
        ready.clone(),
        Always,
    )
    .unwrap();
    for seed in 1..=3u8 {
        vm.invoke("scribble", &[seed]).unwrap();
        common::compare_with_ready(vm.vm(), &reference);
    }
    // Writes that fault (the page tables are supervisor-only) poison, and
    // the poisoned VM is reset fully.
    assert!(vm.invoke("write_system_area", b"").is_err());
    common::compare_with_ready(vm.vm(), &reference);
    assert_eq!(words(&vm.invoke("counter", b"").unwrap()), [1]);
}

/// Resets compared with a naive oracle (a VM that was never used): random
/// request sequences from proptest's seeds, over more resets than the
/// hot-page re-protect period (256), so pages that turn hot, stay hot and
/// are protected again are all covered. Memory is compared in full every 64
/// resets, around the period, and at the end.
#[test]
fn reset_matches_a_naive_oracle_for_random_write_sequences() {
    require_kvm!();
    let config = config();
    let ready = ready(&config);
    let reference = VmInstance::restore(&config, &ready).unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 3,
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&proptest::num::u64::ANY, |seed| {
            let mut vm = ManagedVm::new(
                VmInstance::restore(&config, &ready).unwrap(),
                ready.clone(),
                Never,
            )
            .unwrap();
            let mut x = seed | 1;
            for round in 0..300u32 {
                for _ in 0..(x % 4) + 1 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let input = [(x % 256) as u8, (x >> 8) as u8];
                    match x % 4 {
                        // Mostly a recurring working set (pages turn hot).
                        0 | 1 => vm.invoke("write_pages", &[(x % 24) as u8, input[1]]),
                        2 => vm.invoke("echo", &vec![input[1]; (x % 300_000) as usize]),
                        _ => vm.invoke("leak_kib", &input),
                    }
                    .unwrap();
                }
                vm.reset().unwrap();
                if round % 64 == 0 || (254..=258).contains(&round) || round == 299 {
                    common::compare_with_ready(vm.vm(), &reference);
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Resets that keep pages writable between calls (and copy them back
/// without a fault) still return every page to the snapshot, whatever the
/// write pattern: a set written by every call that is larger than the
/// pages that may stay writable, a region written every other call, pages
/// that are hot for a while and then cool down, pages rewritten with the
/// bytes they already hold (dirty but unchanged, so protected again), pages
/// written only right after such a round, and scattered pages. Whole memory
/// is compared after every reset, over more resets than the re-protect
/// period (256).
#[test]
fn resets_return_every_page_under_changing_write_patterns() {
    require_kvm!();
    const REGION_PAGES: u16 = 6 * 256;
    let config = config().memory_size(16 << 20);
    let mut template = VmInstance::new(&config).unwrap();
    // A 6 MiB region of pseudo-random bytes in the ready snapshot.
    template.invoke("fill_region", &[6, 0, 7]).unwrap();
    let ready = template.snapshot().unwrap();
    drop(template);
    let reference = VmInstance::restore(&config, &ready).unwrap();
    let mut vm = ManagedVm::new(
        VmInstance::restore(&config, &ready).unwrap(),
        ready.clone(),
        Always,
    )
    .unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..600u16 {
        let value = (round % 255) as u8 + 1;
        let mut spans: Vec<(u16, u16, u8)> = vec![(0, 1200, value)];
        if round % 2 == 0 {
            spans.push((1200, 100, value));
        }
        if (round / 40) % 2 == 0 {
            // Hot for 40 calls, then cool for 40.
            spans.push((1300, 50, value));
        }
        // Written every call, but with the bytes already there.
        spans.push((1350, 30, 0));
        // Two successive calls out of every 16, then not at all; and the
        // call right after a round of unchanged writes.
        if round % 16 < 2 {
            spans.push((1380, 30, value));
        }
        if round % 16 == 2 || round % 17 == 0 {
            spans.push((1350, 30, value));
        }
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            spans.push(((x % u64::from(REGION_PAGES)) as u16, 1, value));
        }
        let input: Vec<u8> = spans
            .iter()
            .flat_map(|&(first, count, v)| {
                let [a, b] = first.to_le_bytes();
                let [c, d] = count.to_le_bytes();
                [a, b, c, d, v]
            })
            .collect();
        let written = words(&vm.invoke("write_region", &input).unwrap())[0];
        let expected: u64 = spans.iter().map(|&(_, count, _)| u64::from(count)).sum();
        assert_eq!(written, expected, "round {round}");
        common::compare_with_ready(vm.vm(), &reference);
    }
    assert_eq!(vm.resets(), 600);
}

#[test]
fn register_state_left_by_a_request_is_reset() {
    require_kvm!();
    let config = config();
    let mut kept = managed(&config, Never);
    let clean = words(&kept.invoke("read_cpu_state", b"").unwrap());
    assert_eq!(clean[2], 0x1F80, "default MXCSR");
    assert_eq!(clean[3], 0x37F, "default x87 control word");
    kept.invoke("dirty_cpu_state", b"").unwrap();
    // Without a reset the loaded selectors stay where the CPU keeps them
    // across exits (KVM without VT-x reloads null selectors on every
    // entry). The runtime's promise, on Intel and AMD alike: every call
    // starts with the initial x87/SSE state, MXCSR and FCW included, under
    // any policy — also where the guest cannot use XSAVE (KVM without
    // VT-x on an AMD EPYC hides OSXSAVE from it, and the runtime then
    // resets that state with `fxrstor`).
    let dirty = words(&kept.invoke("read_cpu_state", b"").unwrap());
    assert!(dirty[0] == 0x1B || dirty[0] == clean[0], "{dirty:x?}");
    assert_eq!(dirty[2..], [0x1F80, 0x37F], "{dirty:x?}");
    let mut isolated = managed(&config, Always);
    isolated.invoke("dirty_cpu_state", b"").unwrap();
    assert_eq!(
        words(&isolated.invoke("read_cpu_state", b"").unwrap()),
        clean
    );
}

#[test]
fn a_managed_vm_needs_dirty_tracking() {
    require_kvm!();
    let config = common::config("testguest");
    let ready = ready(&config);
    let vm = VmInstance::restore(&config, &ready).unwrap();
    assert!(ManagedVm::new(vm, ready, Always).is_err());
}

/// Runs `threads` threads at once, each calling `f` `calls` times, and
/// returns each thread's results.
fn on_threads<T: Send>(threads: usize, calls: usize, f: impl Fn() -> T + Sync) -> Vec<Vec<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| (0..calls).map(|_| f()).collect()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn ready_pool_lends_ready_vms_to_threads_and_keeps_them_ready() {
    require_kvm!();
    let config = config();
    let pool = ReadyPool::new(&config, ready(&config), 2, || Always).unwrap();
    // Two threads at once, each with its own VM from the ready state.
    let outputs: Vec<Vec<u64>> = on_threads(2, 20, || {
        words(&pool.get().unwrap().invoke("counter", b"").unwrap())[0]
    });
    assert!(outputs.iter().flatten().all(|&n| n == 1), "{outputs:?}");
    let stats = pool.stats();
    assert_eq!((stats.created, stats.in_use, stats.discarded), (2, 0, 0));
    assert_eq!(stats.idle, 2);
    assert_eq!(stats.resets, 40);

    // A panic poisons the VM; it comes back reset and serves the next call.
    {
        let mut vm = pool.get().unwrap();
        let err = vm.invoke("panic", b"").unwrap_err();
        assert_eq!(err.kind(), snapvm::ErrorKind::GuestCrash);
        assert_eq!(vm.resets(), 1);
        assert_eq!(pool.stats().in_use, 1);
    }
    assert_eq!(
        words(&pool.get().unwrap().invoke("counter", b"").unwrap()),
        [1]
    );
    assert_eq!(pool.stats().created, 2);
}

#[test]
fn ready_pool_reuses_the_last_vm_given_back_and_bounds_idle_vms() {
    require_kvm!();
    let config = config();
    let pool = ReadyPool::new(&config, ready(&config), 1, || Never).unwrap();
    // Under `Never` the counter counts up on the one VM lent again and again.
    for expected in 1..=5 {
        assert_eq!(
            words(&pool.get().unwrap().invoke("counter", b"").unwrap()),
            [expected]
        );
    }
    // Two lent at once: the second is restored from the snapshot (a fresh
    // counter); only one fits back in a pool of capacity 1.
    let mut a = pool.get().unwrap();
    let mut b = pool.get().unwrap();
    assert_eq!(words(&a.invoke("counter", b"").unwrap()), [6]);
    assert_eq!(words(&b.invoke("counter", b"").unwrap()), [1]);
    assert_eq!(pool.stats().in_use, 2);
    drop(a);
    drop(b);
    let stats = pool.stats();
    assert_eq!((stats.created, stats.idle, stats.discarded), (2, 1, 1));
    assert_eq!(stats.shells.recycled, 1);
}

#[test]
fn ready_pool_gives_each_thread_its_own_vm_back() {
    require_kvm!();
    let config = config();
    let pool = ReadyPool::new(&config, ready(&config), 2, || Never).unwrap();
    // Under `Never` a VM's counter counts every call it served: each thread
    // counting 1, 2, 3, ... means each kept its own VM throughout.
    let counts: Vec<Vec<u64>> = on_threads(2, 30, || {
        words(&pool.get().unwrap().invoke("counter", b"").unwrap())[0]
    });
    for thread in &counts {
        assert_eq!(*thread, (1..=30).collect::<Vec<u64>>());
    }
    assert_eq!(pool.stats().created, 2);
}
