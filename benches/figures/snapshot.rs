//! Snapshot figures: capture, restore (cold from a file, eager and lazy,
//! into a pooled shell) and density, for 64 MiB guests.
//!
//! - `snapshot.capture_us`: `vm.snapshot()` of a ready quickstart VM.
//! - `snapshot.diff_capture_us`: `vm.snapshot_diff(&base)` of a testguest
//!   VM (dirty tracking on) that dirtied 16 pages (`write_pages [16, x]`)
//!   since its base; the pages are re-dirtied before each sample and only
//!   the diff call is timed. Every [`DIFF_CHAIN`] samples a new full
//!   snapshot starts a new chain, so the chain stays short.
//! - `restore.cold_us`: `Snapshot::load` of a file saved once (and read
//!   once, so it is in the page cache), `VmInstance::restore` (the default
//!   strategy) and `invoke("empty")`, against `kvm.create_us` from the VM
//!   figures of the same run.
//! - `restore.cold_eager_us` / `restore.cold_lazy_us`: from the loaded
//!   snapshot, `restore_with(strategy)` and `invoke("empty")`.
//! - `restore.pooled_us`: from the loaded snapshot, `pool.restore` into a
//!   pre-created shell and `invoke("empty")`. The pool never runs dry: after
//!   each sample the bench pauses until the refill thread has topped the
//!   pool up again (so the refill never runs during a timed sample either),
//!   and every sample asserts a shell was waiting.
//! - `density.kib_per_vm`: (PSS with N VMs − PSS before) / N, in KiB, for
//!   N VMs restored from one loaded snapshot file of the quickstart guest,
//!   each having served one `reverse` request. PSS is
//!   `/proc/self/smaps_rollup`'s `Pss`; it counts user memory only (guest
//!   memory, page-cache pages mapped, the host heap), not KVM's kernel
//!   memory. "Before" is taken after one restore of each strategy, so the
//!   snapshot image the restores read (mapped by the loaded snapshot) is in
//!   both readings. Measured for both strategies
//!   (`density.kib_per_vm_eager`, `density.kib_per_vm_lazy`);
//!   `density.kib_per_vm` is the lower of the two, and a note line names
//!   the strategy. N is 100, also with `--quick`; each strategy is measured
//!   5 times (2 with `--quick`) and the figure is the median of those.
//!
//! Restore samples of all four kinds are interleaved in small blocks, so
//! load from other processes on a shared machine hits them alike.

use std::path::Path;
use std::time::{Duration, Instant};

use snapvm::snapshot::{RestoreStrategy, ShellPool};
use snapvm::vm::raw::{RawGuest, EXIT_LOOP};
use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance};

use super::{time_us, Ctx, Figure, Stats, Target};

/// Guest memory of every VM here (the `VmConfig` default).
const MEMORY: u64 = 64 << 20;
/// Diffs taken against one chain before a new full snapshot restarts it.
const DIFF_CHAIN: usize = 25;
/// Samples of each restore figure per interleaved block.
const BLOCK: usize = 10;
/// Shells in the pool of `restore.pooled_us`.
const POOL_SHELLS: usize = 4;
/// VMs behind `density.kib_per_vm`.
const DENSITY_VMS: usize = 100;

/// Measures the snapshot figures, or returns none when KVM is unusable (the
/// VM figures have said so already). `so_far` holds the figures measured
/// earlier in the run; the restore figures are judged against its
/// `kvm.create_us`.
pub fn measure(ctx: &Ctx, so_far: &[Figure]) -> Vec<Figure> {
    if !super::kvm_usable("snapshot") {
        return Vec::new();
    }
    let create = so_far.iter().find(|f| f.name == "kvm.create_us");
    let against = |figure: Figure| match create {
        Some(base) => figure.against(base),
        None => figure,
    };
    // As in the VM figures: one idle VM stays alive throughout, so no VM
    // created here is the host's only one (KVM's first-VM costs stay out).
    let _idle = RawGuest::new(EXIT_LOOP, MEMORY).expect("raw guest");
    let quickstart = guest_config("quickstart")
        .host_function("greeting", |_| Ok(b"Hello".to_vec()))
        .memory_size(MEMORY);

    let capture = Figure::of("snapshot.capture_us", &capture(ctx, &quickstart), "us");
    let diff = Figure::of("snapshot.diff_capture_us", &diff_capture(ctx), "us");

    let dir = std::env::temp_dir().join(format!("snapvm-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the bench directory");
    let path = dir.join("quickstart.snap");
    VmInstance::new(&quickstart)
        .expect("quickstart VM")
        .snapshot()
        .expect("snapshot")
        .save(&path)
        .expect("saving the snapshot");

    let restores = restores(ctx, &quickstart, &path);
    let cold =
        against(Figure::of("restore.cold_us", &restores.cold, "us")).target(Target::AtMost(3.0));
    let eager = against(Figure::of("restore.cold_eager_us", &restores.eager, "us"));
    let lazy = against(Figure::of("restore.cold_lazy_us", &restores.lazy, "us"));
    let pooled = against(Figure::of("restore.pooled_us", &restores.pooled, "us"))
        .target(Target::AtMost(1.0));

    let density = density(ctx, &quickstart, &path);
    let _ = std::fs::remove_dir_all(&dir);

    let mut figures = vec![capture, diff, cold, eager, lazy, pooled];
    figures.extend(density);
    figures
}

/// A guest program from the build's guest directory, 64 MiB.
fn guest_config(name: &str) -> VmConfig {
    let path = Path::new(env!("SNAPVM_GUESTS_DIR")).join(name);
    let program = GuestProgram::from_file(&path)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    VmConfig::new(program).memory_size(MEMORY)
}

/// `snapshot.capture_us`: full snapshots of one ready quickstart VM.
fn capture(ctx: &Ctx, config: &VmConfig) -> Stats {
    let mut vm = VmInstance::new(config).expect("quickstart VM");
    vm.invoke("empty", b"").expect("invoke empty");
    for _ in 0..3 {
        drop(vm.snapshot().expect("snapshot"));
    }
    let mut samples: Vec<f64> = (0..ctx.samples(1000, 100))
        .map(|_| {
            let mut snap = None;
            let us = time_us(|| snap = Some(vm.snapshot().expect("snapshot")));
            drop(snap);
            us
        })
        .collect();
    Stats::of(&mut samples)
}

/// `snapshot.diff_capture_us`: diffs of 16 freshly dirtied pages.
fn diff_capture(ctx: &Ctx) -> Stats {
    let config = guest_config("testguest").dirty_tracking(true);
    let mut vm = VmInstance::new(&config).expect("testguest VM");
    let n = ctx.samples(1000, 100);
    let mut samples = Vec::with_capacity(n);
    let mut value = 0u8;
    let mut base = vm.snapshot().expect("snapshot");
    // One unmeasured diff first: the first write after tracking starts may
    // fault in pages for the first time.
    vm.invoke("write_pages", &[16, 0xA5])
        .expect("invoke write_pages");
    base = vm.snapshot_diff(&base).expect("diff snapshot");
    while samples.len() < n {
        if samples.len() % DIFF_CHAIN == 0 {
            base = vm.snapshot().expect("snapshot");
        }
        value = value.wrapping_add(1) | 1;
        vm.invoke("write_pages", &[16, value])
            .expect("invoke write_pages");
        let mut diff = None;
        samples.push(time_us(|| {
            diff = Some(vm.snapshot_diff(&base).expect("diff snapshot"));
        }));
        base = diff.expect("diff taken");
        debug_assert!(base.stored_bytes() >= 16 * 4096);
    }
    Stats::of(&mut samples)
}

/// Samples of the four restore figures.
struct Restores {
    cold: Stats,
    eager: Stats,
    lazy: Stats,
    pooled: Stats,
}

/// The restore figures, interleaved in blocks of [`BLOCK`] samples each.
fn restores(ctx: &Ctx, config: &VmConfig, path: &Path) -> Restores {
    let empty = |vm: &mut VmInstance| {
        let out = vm.invoke("empty", b"").expect("invoke empty");
        debug_assert!(out.is_empty());
    };
    let cold = || {
        let mut vm = None;
        let us = time_us(|| {
            let snap = Snapshot::load(path).expect("loading the snapshot");
            let mut restored = VmInstance::restore(config, &snap).expect("restore");
            empty(&mut restored);
            vm = Some(restored);
        });
        drop(vm);
        us
    };
    let loaded = Snapshot::load(path).expect("loading the snapshot");
    let with = |strategy| {
        let mut vm = None;
        let us = time_us(|| {
            let mut restored =
                VmInstance::restore_with(config, &loaded, strategy).expect("restore_with");
            empty(&mut restored);
            vm = Some(restored);
        });
        drop(vm);
        us
    };
    let pool = ShellPool::new(config, POOL_SHELLS).expect("shell pool");
    let pooled = || {
        wait_full(&pool);
        let mut vm = None;
        let us = time_us(|| {
            let mut restored = pool.restore(&loaded).expect("pooled restore");
            empty(&mut restored);
            vm = Some(restored);
        });
        drop(vm);
        us
    };

    // Warm up: the file into the page cache, each path once.
    for _ in 0..3 {
        cold();
        with(RestoreStrategy::Eager);
        with(RestoreStrategy::Lazy);
        pooled();
    }
    let rounds = ctx.samples(60, 10);
    let n = rounds * BLOCK;
    let mut samples = [(); 4].map(|_| Vec::with_capacity(n));
    for _ in 0..rounds {
        samples[0].extend((0..BLOCK).map(|_| cold()));
        samples[1].extend((0..BLOCK).map(|_| with(RestoreStrategy::Eager)));
        samples[2].extend((0..BLOCK).map(|_| with(RestoreStrategy::Lazy)));
        samples[3].extend((0..BLOCK).map(|_| pooled()));
        // Let the refill finish before the next block's cold samples.
        wait_full(&pool);
    }
    let [cold, eager, lazy, pooled] = samples.map(|mut s| Stats::of(&mut s));
    Restores {
        cold,
        eager,
        lazy,
        pooled,
    }
}

/// Waits (sleeping) until the pool's refill thread has filled it again.
fn wait_full(pool: &ShellPool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.available() < POOL_SHELLS {
        assert!(Instant::now() < deadline, "the shell pool does not refill");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// This process's proportional set size, in KiB.
fn pss_kib() -> f64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").expect("reading smaps_rollup");
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .expect("a Pss line in smaps_rollup")
}

/// `density.kib_per_vm` for both strategies, and the lower of the two. Each
/// strategy is measured `ctx.samples(5, 2)` times (alternating); each
/// measurement is one sample: the mean over [`DENSITY_VMS`] VMs.
fn density(ctx: &Ctx, config: &VmConfig, path: &Path) -> Vec<Figure> {
    let snap = Snapshot::load(path).expect("loading the snapshot");
    let serve = |strategy| {
        let mut vm = VmInstance::restore_with(config, &snap, strategy).expect("restore");
        let out = vm.invoke("reverse", b"density").expect("invoke reverse");
        assert_eq!(out, b"ytisned");
        vm
    };
    // Map and verify the snapshot image, and warm the allocator, before the
    // first "before" reading.
    drop(serve(RestoreStrategy::Eager));
    drop(serve(RestoreStrategy::Lazy));
    let per_vm = |strategy| {
        let before = pss_kib();
        let vms: Vec<VmInstance> = (0..DENSITY_VMS).map(|_| serve(strategy)).collect();
        let after = pss_kib();
        drop(vms);
        (after - before) / DENSITY_VMS as f64
    };
    let runs = ctx.samples(5, 2);
    let (mut eager, mut lazy) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        eager.push(per_vm(RestoreStrategy::Eager));
        lazy.push(per_vm(RestoreStrategy::Lazy));
    }
    let (eager, lazy) = (Stats::of(&mut eager), Stats::of(&mut lazy));
    let (best, which) = if lazy.median <= eager.median {
        (lazy, "lazy")
    } else {
        (eager, "eager")
    };
    println!(
        "note: density.kib_per_vm uses the {which} strategy (mean over {DENSITY_VMS} VMs per \
         sample; eager {:.0} KiB, lazy {:.0} KiB per VM; the image stores {} KiB)",
        eager.median,
        lazy.median,
        snap.stored_bytes() >> 10
    );
    vec![
        Figure::of("density.kib_per_vm", &best, "KiB").target(Target::AtMost(1024.0)),
        Figure::of("density.kib_per_vm_eager", &eager, "KiB"),
        Figure::of("density.kib_per_vm_lazy", &lazy, "KiB"),
    ]
}
