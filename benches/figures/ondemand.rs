//! Working-set traces and restore straight from the store.
//!
//! Wiring: `all.extend(figures::ondemand::measure(&ctx));` in
//! `benches/report.rs`, `pub mod ondemand;` in `benches/figures/mod.rs`.
//!
//! The guest: a 256 MiB testguest VM whose `fill_region` filled 200 MiB of
//! heap with pseudo-random words (so the snapshot stores about 200 MiB),
//! snapshotted ready. Its request, `touch_region`, reads 4096 pages (16 MiB)
//! in 256 runs of 16 pages (64 KiB) spread evenly over the region.
//!
//! - `trace.first_invoke_cold_us`: with the snapshot file evicted from the
//!   page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`, no VM mapping it),
//!   a lazy restore and the first `touch_region`.
//! - `trace.first_invoke_cold_traced_us`: the same with the recorded
//!   working set prefetched first (`WorkingSet::prefetch`, included in the
//!   time).
//! - `trace.prefetch_speedup`: the first ÷ the second, target `>= 3.0`.
//! - `trace.first_invoke_warm_us` / `trace.first_invoke_warm_traced_us`:
//!   the same with the file in the page cache (no speedup expected: the
//!   trace then saves no disk reads).
//! - `store.restore_download_ms`: the snapshot in an `FsBackend` store:
//!   `Snapshot::load_from_store` (fetch, verify and decrypt every stored
//!   block), restore, first `touch_region`.
//! - `store.restore_ondemand_ms`: `Snapshot::open_from_store` on an empty
//!   block cache, the recorded working set prefetched (fetched by 4
//!   threads while the guest starts), restore, first `touch_region`. Judged
//!   against the download, target `<= 0.25`.
//!
//! Cold and traced samples alternate, so load on a shared machine hits
//! both alike.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use snapvm::snapshot::OnDemandConfig;
use snapvm::snapshot::WorkingSet;
use snapvm::store::{ConvergentStore, ManifestKey};
use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance};

use super::{time_us, Ctx, Figure, Stats, Target};

const MEMORY: u64 = 256 << 20;
const REGION_MIB: u16 = 200;
const TOUCHED_PAGES: u32 = 4096;
const RUN_PAGES: u32 = 16;

fn request() -> Vec<u8> {
    [TOUCHED_PAGES.to_le_bytes(), RUN_PAGES.to_le_bytes()].concat()
}

/// Drops `path`'s pages from the page cache.
fn evict(path: &Path) {
    let file = std::fs::File::open(path).expect("opening the snapshot file");
    // SAFETY: posix_fadvise on a descriptor we own; it only drops clean
    // cached pages of the file.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn first_invoke(config: &VmConfig, snapshot: &Snapshot, trace: Option<&WorkingSet>) -> f64 {
    time_us(|| {
        if let Some(t) = trace {
            assert!(t.prefetch(snapshot));
        }
        let mut vm = VmInstance::restore(config, snapshot).expect("restore");
        vm.invoke("touch_region", &request()).expect("touch_region");
    })
}

/// Measures the trace and on-demand figures (none without KVM).
pub fn measure(ctx: &Ctx) -> Vec<Figure> {
    if !super::kvm_usable("trace") {
        return Vec::new();
    }
    let path = Path::new(env!("SNAPVM_GUESTS_DIR")).join("testguest");
    let config = VmConfig::new(GuestProgram::from_file(&path).expect("testguest"))
        .memory_size(MEMORY)
        .timeout(None);
    // On the machine's disk, not a tmpfs: eviction must mean disk reads.
    let dir = tempfile::Builder::new()
        .prefix("snapvm-trace-")
        .tempdir_in(std::env::var_os("SNAPVM_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()))
        .or_else(|_| tempfile::tempdir())
        .expect("bench directory");
    let file = dir.path().join("region.snap");
    let snapshot = {
        let mut vm = VmInstance::new(&config).expect("testguest VM");
        let [lo, hi] = REGION_MIB.to_le_bytes();
        vm.invoke("fill_region", &[lo, hi, 3]).expect("fill_region");
        vm.snapshot().expect("snapshot")
    };
    snapshot.save(&file).expect("saving the snapshot");
    let loaded = Snapshot::load(&file).expect("loading the snapshot");

    // Record the working set of one first invocation (this also verifies
    // the file once, as every later restore of this handle relies on).
    let mut trace = WorkingSet::new(&loaded);
    {
        let mut vm = VmInstance::restore(&config, &loaded).expect("restore");
        vm.invoke("touch_region", &request()).expect("touch_region");
        trace.record(&vm).expect("recording the working set");
    }

    let samples = ctx.samples(5, 1);
    let (mut cold, mut cold_traced, mut warm, mut warm_traced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        evict(&file);
        cold.push(first_invoke(&config, &loaded, None));
        evict(&file);
        cold_traced.push(first_invoke(&config, &loaded, Some(&trace)));
        warm.push(first_invoke(&config, &loaded, None));
        warm_traced.push(first_invoke(&config, &loaded, Some(&trace)));
    }
    let cold = Stats::of(&mut cold);
    let cold_traced = Stats::of(&mut cold_traced);
    let cold_fig = Figure::of("trace.first_invoke_cold_us", &cold, "us");
    let traced_fig = Figure::of("trace.first_invoke_cold_traced_us", &cold_traced, "us");
    let mut speedup = Figure::plain(
        "trace.prefetch_speedup",
        cold.median / cold_traced.median,
        "x",
    )
    .target(Target::AtLeast(3.0));
    speedup.spread = Some((cold.p10 / cold_traced.p90, cold.p90 / cold_traced.p10));
    let warm_fig = Figure::of("trace.first_invoke_warm_us", &Stats::of(&mut warm), "us");
    let warm_traced_fig = Figure::of(
        "trace.first_invoke_warm_traced_us",
        &Stats::of(&mut warm_traced),
        "us",
    );

    // The same snapshot in a store on this disk.
    let store_dir = dir.path().join("store");
    let store = Arc::new(
        ConvergentStore::open_dir(&store_dir, ManifestKey::from_bytes([4; 32])).expect("store"),
    );
    let id = loaded.save_to_store(&store).expect("saving to the store");
    let on_demand = || {
        Snapshot::open_from_store(&store, &id, &OnDemandConfig::default()).expect("open on demand")
    };
    // The working set of a VM restored on demand (in fault order).
    let od_trace = {
        let snap = on_demand();
        let mut vm = VmInstance::restore(&config, &snap).expect("restore on demand");
        vm.invoke("touch_region", &request()).expect("touch_region");
        let mut t = WorkingSet::new(&snap);
        t.record(&vm).expect("recording the working set");
        t
    };
    let store_samples = ctx.samples(3, 1);
    let (mut download, mut ondemand) = (Vec::new(), Vec::new());
    for _ in 0..store_samples {
        download.push(
            time_us(|| {
                let snap = Snapshot::load_from_store(&store, &id).expect("download");
                let mut vm = VmInstance::restore(&config, &snap).expect("restore");
                vm.invoke("touch_region", &request()).expect("touch_region");
            }) / 1e3,
        );
        ondemand.push(
            time_us(|| {
                let snap = on_demand();
                assert!(od_trace.prefetch(&snap));
                let mut vm = VmInstance::restore(&config, &snap).expect("restore");
                vm.invoke("touch_region", &request()).expect("touch_region");
            }) / 1e3,
        );
    }
    let download = Figure::of("store.restore_download_ms", &Stats::of(&mut download), "ms");
    let ondemand = Figure::of("store.restore_ondemand_ms", &Stats::of(&mut ondemand), "ms")
        .against(&download)
        .target(Target::AtMost(0.25));
    vec![
        cold_fig,
        traced_fig,
        speedup,
        warm_fig,
        warm_traced_fig,
        download,
        ondemand,
    ]
}
