//! VmInstance figures and their bare-KVM baselines.
//!
//! Each figure is measured beside its baseline in the same run, interleaved
//! in small blocks so that load from other processes on a shared machine
//! hits both alike.

use std::path::Path;

use snapvm::vm::raw::{self, RawGuest, EXIT_LOOP, TOUCHED_PAGES, TOUCH_STACK_PAGES};
use snapvm::{GuestProgram, VmConfig, VmInstance};

use super::{time_us, Ctx, Figure, Stats, Target};

/// Guest memory of the raw baseline VMs (the `VmConfig` default).
const RAW_MEMORY: u64 = 64 << 20;
/// Samples taken of each figure per interleaved block.
const BLOCK: usize = 50;
/// Payload of `invoke.1mib_us`, each way.
const ONE_MIB: usize = 1 << 20;

/// Measures the VM figures, or returns none (after one line saying so) when
/// KVM is unusable and `SNAPVM_REQUIRE_KVM` is not set.
pub fn measure(ctx: &Ctx) -> Vec<Figure> {
    if !super::kvm_usable("VM") {
        return Vec::new();
    }
    let config = quickstart_config();
    // One idle VM stays alive throughout, as in an executor that runs VMs.
    // Without it, every VM created is the host's only one, and KVM flips
    // static keys (patching kernel text and sending IPIs to every CPU) on
    // the first vCPU's creation and the last one's destruction: that adds
    // ~0.5 ms to each `kvm.create_us` and `vm.new_us` sample here.
    let _idle = RawGuest::new(EXIT_LOOP, RAW_MEMORY).expect("raw guest");

    let (exit, warm, one_mib, typed, typed_func) = exits_and_invokes(ctx, &config);
    let exit = Figure::of("kvm.exit_us", &exit, "us");
    let fault = Figure::of("kvm.fault_us", &first_touch(ctx), "us");
    let (create, new) = creation(ctx, &config);
    let create = Figure::of("kvm.create_us", &create, "us");
    let new = Figure::of("vm.new_us", &new, "us").against(&create);
    let warm = Figure::of("invoke.warm_us", &warm, "us")
        .against(&exit)
        .target(Target::AtMost(1.5));
    let one_mib = Figure::of("invoke.1mib_us", &one_mib, "us").against(&exit);
    let typed = Figure::of("invoke.typed_us", &typed, "us")
        .against(&warm)
        .target(Target::AtMost(1.1));
    let typed_func = Figure::of("invoke.typed_func_us", &typed_func, "us")
        .against(&warm)
        .target(Target::AtMost(1.1));
    let (managed, managed_typed) = managed_calls(ctx, &config);
    let managed = Figure::of("invoke.managed_us", &managed, "us").against(&exit);
    let managed_typed = Figure::of("invoke.managed_typed_us", &managed_typed, "us")
        .against(&managed)
        .target(Target::AtMost(1.1));
    vec![
        exit,
        fault,
        create,
        new,
        warm,
        one_mib,
        typed,
        typed_func,
        managed,
        managed_typed,
    ]
}

/// `invoke.managed_us` and `invoke.managed_typed_us`: the same call of
/// `sum_point` through a `ManagedVm` (policy `Never`), once with the input
/// already encoded (`invoke`) and once typed (`ManagedVm::call`), in
/// interleaved blocks.
fn managed_calls(ctx: &Ctx, config: &VmConfig) -> (Stats, Stats) {
    use snapvm::policy::{ManagedVm, Never};
    let config = config.clone().dirty_tracking(true);
    let mut vm = VmInstance::new(&config).expect("quickstart VM");
    let ready = vm.snapshot().expect("ready snapshot");
    vm.restore_in_place(&ready).expect("restore");
    let mut managed = ManagedVm::new(vm, ready, Never).expect("managed VM");
    let point = Point { x: 40, y: 2 };
    // The bytes `ManagedVm::call` sends: the same encoder.
    let encoded = postcard::to_allocvec(&point).expect("encode");
    let untyped = |m: &mut ManagedVm<Never>| {
        let out = m.invoke("sum_point", &encoded).expect("invoke sum_point");
        debug_assert!(!out.is_empty());
    };
    let typed = |m: &mut ManagedVm<Never>| {
        let sum: i64 = m.call("sum_point", &point).expect("typed call");
        debug_assert_eq!(sum, 42);
    };
    for _ in 0..200 {
        untyped(&mut managed);
        typed(&mut managed);
    }
    let rounds = ctx.samples(200, 20);
    let mut plain = Vec::with_capacity(rounds * BLOCK);
    let mut typeds = Vec::with_capacity(rounds * BLOCK);
    for _ in 0..rounds {
        plain.extend((0..BLOCK).map(|_| time_us(|| untyped(&mut managed))));
        typeds.extend((0..BLOCK).map(|_| time_us(|| typed(&mut managed))));
    }
    (Stats::of(&mut plain), Stats::of(&mut typeds))
}

/// The quickstart guest, configured as in the README.
fn quickstart_config() -> VmConfig {
    let path = Path::new(env!("SNAPVM_GUESTS_DIR")).join("quickstart");
    let program = GuestProgram::from_file(&path)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    VmConfig::new(program).host_function("greeting", |_| Ok(b"Hello".to_vec()))
}

/// The small struct of `invoke.typed_us`.
#[derive(serde::Serialize)]
struct Point {
    x: i32,
    y: i32,
}

/// `kvm.exit_us`, `invoke.warm_us`, `invoke.1mib_us`, `invoke.typed_us`
/// (a typed call with a small struct in and an integer out,
/// `VmInstance::call`) and `invoke.typed_func_us` (that call through a
/// `TypedFunc` resolved once), interleaved: each round runs a block of bare
/// exits, a block of empty invokes, a block of typed calls, a block of
/// `TypedFunc` calls and a tenth of a block of 1 MiB echoes.
fn exits_and_invokes(ctx: &Ctx, config: &VmConfig) -> (Stats, Stats, Stats, Stats, Stats) {
    let mut guest = RawGuest::new(EXIT_LOOP, RAW_MEMORY).expect("raw guest");
    let mut vm = VmInstance::new(config).expect("quickstart VM");
    let input = vec![0x5A; ONE_MIB];
    let mut output = vec![0; ONE_MIB];

    let mut exit = || {
        guest.run_once().expect("bare exit");
    };
    let empty = |vm: &mut VmInstance| {
        let out = vm.invoke("empty", b"").expect("invoke empty");
        debug_assert!(out.is_empty());
    };
    let typed = |vm: &mut VmInstance| {
        let sum: i64 = vm
            .call("sum_point", &Point { x: 40, y: 2 })
            .expect("typed call");
        debug_assert_eq!(sum, 42);
    };
    let sum_point = vm
        .typed_func::<Point, i64>("sum_point")
        .expect("sum_point resolves");
    let typed_func = |vm: &mut VmInstance| {
        let sum = sum_point
            .call(vm, &Point { x: 40, y: 2 })
            .expect("TypedFunc call");
        debug_assert_eq!(sum, 42);
    };
    let echo = |vm: &mut VmInstance, output: &mut [u8]| {
        let len = vm.invoke_into("echo", &input, output).expect("invoke echo");
        assert_eq!(len, ONE_MIB);
    };

    // Warm up: fault in every page both paths touch (the guest grows its
    // input buffer on the first 1 MiB call) and let the CPU settle.
    for _ in 0..200 {
        exit();
        empty(&mut vm);
        typed(&mut vm);
        typed_func(&mut vm);
    }
    for _ in 0..5 {
        echo(&mut vm, &mut output);
    }

    let rounds = ctx.samples(400, 40);
    let mut exits = Vec::with_capacity(rounds * BLOCK);
    let mut warms = Vec::with_capacity(rounds * BLOCK);
    let mut mibs = Vec::with_capacity(rounds * BLOCK / 10);
    let mut typeds = Vec::with_capacity(rounds * BLOCK);
    let mut typed_funcs = Vec::with_capacity(rounds * BLOCK);
    for _ in 0..rounds {
        exits.extend((0..BLOCK).map(|_| time_us(&mut exit)));
        warms.extend((0..BLOCK).map(|_| time_us(|| empty(&mut vm))));
        typeds.extend((0..BLOCK).map(|_| time_us(|| typed(&mut vm))));
        typed_funcs.extend((0..BLOCK).map(|_| time_us(|| typed_func(&mut vm))));
        mibs.extend((0..BLOCK / 10).map(|_| time_us(|| echo(&mut vm, &mut output))));
    }
    assert_eq!(output[ONE_MIB - 1], 0x5A, "echo returned its input");
    (
        Stats::of(&mut exits),
        Stats::of(&mut warms),
        Stats::of(&mut mibs),
        Stats::of(&mut typeds),
        Stats::of(&mut typed_funcs),
    )
}

/// `kvm.fault_us`: the first run of a fresh VM that touches
/// [`TOUCHED_PAGES`] fresh 4 KiB pages, minus the first run of a fresh VM
/// that exits at once (so the costs of any first run — the vCPU's first
/// entry, faulting in the code page and page tables — cancel out), divided
/// by the pages. Pairs of VMs alternate; the figure is the median of the
/// per-pair differences.
fn first_touch(ctx: &Ctx) -> Stats {
    let first_run = |code: &[u8]| {
        let mut guest = RawGuest::new(code, RAW_MEMORY).expect("raw guest");
        let us = time_us(|| {
            guest.run_once().expect("first run");
        });
        drop(guest);
        us
    };
    first_run(TOUCH_STACK_PAGES);
    let mut per_page: Vec<f64> = (0..ctx.samples(100, 20))
        .map(|_| {
            let bare = first_run(EXIT_LOOP);
            let touching = first_run(TOUCH_STACK_PAGES);
            (touching - bare) / TOUCHED_PAGES as f64
        })
        .collect();
    Stats::of(&mut per_page)
}

/// `kvm.create_us` and `vm.new_us`, alternating.
fn creation(ctx: &Ctx, config: &VmConfig) -> (Stats, Stats) {
    let create = || {
        raw::create_empty_vm().expect("empty VM");
    };
    let new = || {
        let mut vm = None;
        let us = time_us(|| vm = Some(VmInstance::new(config).expect("quickstart VM")));
        drop(vm);
        us
    };
    for _ in 0..5 {
        create();
        new();
    }
    let n = ctx.samples(1000, 100);
    let mut creates = Vec::with_capacity(n);
    let mut news = Vec::with_capacity(n);
    for _ in 0..n {
        creates.push(time_us(create));
        news.push(new());
    }
    (Stats::of(&mut creates), Stats::of(&mut news))
}
