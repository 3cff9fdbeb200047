//! Guest-profile figures, with the regex guest (`guests/regexguest`),
//! whose init compiles a set of log-scanning patterns into one dense DFA
//! with `regex-automata` and exports the serialized DFA as its profile.
//!
//! Wiring (in `benches/report.rs`): `all.extend(figures::trace::measure(&ctx));`
//! and `pub mod trace;` in `benches/figures/mod.rs`.
//!
//! - `trace.profile_cold_ms`: first invoke of a new environment without a
//!   profile: `VmInstance::new` (boot, init compiling the DFA and exporting
//!   it into an empty in-memory `TraceCache`) and one `scan` of a small log.
//! - `trace.profile_warm_ms`: the same with the profile an earlier
//!   environment exported waiting in the cache: init imports, validates
//!   and loads the serialized DFA instead of compiling.
//! - `trace.profile_speedup`: cold ÷ warm (medians), target `>= 2.0`.
//! - `restore.heavy_boot_ms`: boot + init (compile, no profile scope) +
//!   first `scan`.
//! - `restore.heavy_pooled_us`: the ready regex guest restored from its
//!   snapshot file (saved once, in the page cache, `Snapshot::load`ed once)
//!   into a pre-created shell of a `ShellPool` (refilled between samples,
//!   as for `restore.pooled_us`) + first `scan`.
//! - `restore.heavy_init_speedup`: heavy boot ÷ heavy pooled (medians),
//!   target `>= 50`: what a ready-state snapshot saves a guest with real
//!   init work.
//!
//! Samples are interleaved so load from other processes hits them alike.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapvm::snapshot::ShellPool;
use snapvm::trace::{ProfileScope, TraceCache};
use snapvm::vm::raw::{RawGuest, EXIT_LOOP};
use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance};

use super::{time_us, Ctx, Figure, Stats, Target};

const MEMORY: u64 = 64 << 20;
const POOL_SHELLS: usize = 2;
/// The log every first call scans.
const LOG: &[u8] = b"2024-05-01 10:00:00 GET /index.html 10.0.0.1 user=alice\n\
2024-05-01 10:00:01 POST /login token=abc123 ERROR refused\n\
HTTP/1.1\" 503 from 192.168.1.20 panic\n";

/// Measures the trace figures, or none when KVM is unusable.
pub fn measure(ctx: &Ctx) -> Vec<Figure> {
    if !super::kvm_usable("trace") {
        return Vec::new();
    }
    // As in the VM figures: no VM created here is the host's only one.
    let _idle = RawGuest::new(EXIT_LOOP, MEMORY).expect("raw guest");
    let path = Path::new(env!("SNAPVM_GUESTS_DIR")).join("regexguest");
    let program = GuestProgram::from_file(&path)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    let plain = VmConfig::new(program).memory_size(MEMORY);

    let first_call = |config: &VmConfig, expect: &str| {
        let mut vm = None;
        let us = time_us(|| {
            let mut fresh = VmInstance::new(config).expect("regexguest boots");
            fresh.invoke("scan", LOG).expect("scan");
            vm = Some(fresh);
        });
        let mut vm = vm.expect("set above");
        assert_eq!(vm.invoke("source", b"").expect("source"), expect.as_bytes());
        us
    };
    let cold = || {
        let cache = Arc::new(TraceCache::in_memory(64 << 20));
        first_call(
            &plain.clone().profiles(ProfileScope::new(cache, "bench")),
            "compiled",
        )
    };
    let warm_cache = Arc::new(TraceCache::in_memory(64 << 20));
    let warm_config = plain
        .clone()
        .profiles(ProfileScope::new(Arc::clone(&warm_cache), "bench"));
    VmInstance::new(&warm_config).expect("regexguest boots (fills the cache)");
    let warm = || first_call(&warm_config, "imported");
    let heavy_boot = || first_call(&plain, "compiled");

    let dir = std::env::temp_dir().join(format!("snapvm-report-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the bench directory");
    let snap_path = dir.join("regexguest.snap");
    VmInstance::new(&plain)
        .expect("regexguest boots")
        .snapshot()
        .expect("snapshot")
        .save(&snap_path)
        .expect("saving the snapshot");
    let loaded = Snapshot::load(&snap_path).expect("loading the snapshot");
    let pool = ShellPool::new(&plain, POOL_SHELLS).expect("shell pool");
    let pooled = || {
        wait_full(&pool);
        let mut vm = None;
        let us = time_us(|| {
            let mut restored = pool.restore(&loaded).expect("pooled restore");
            restored.invoke("scan", LOG).expect("scan");
            vm = Some(restored);
        });
        drop(vm);
        us
    };

    // Warm up the fast paths (the slow ones are 100+ ms each: a warm-up
    // changes nothing there).
    warm();
    pooled();
    let rounds = ctx.samples(9, 2);
    let mut samples: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        samples[0].push(cold());
        samples[1].push(warm());
        samples[2].push(heavy_boot());
        for _ in 0..ctx.samples(5, 3) {
            samples[3].push(pooled());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let [cold, warm, boot, pooled] = samples.map(|mut s| Stats::of(&mut s));
    let ms = |s: Stats| Stats {
        median: s.median / 1e3,
        p10: s.p10 / 1e3,
        p90: s.p90 / 1e3,
        count: s.count,
    };
    vec![
        Figure::of("trace.profile_cold_ms", &ms(cold), "ms"),
        Figure::of("trace.profile_warm_ms", &ms(warm), "ms"),
        Figure::plain("trace.profile_speedup", cold.median / warm.median, "x")
            .target(Target::AtLeast(2.0)),
        Figure::of("restore.heavy_boot_ms", &ms(boot), "ms"),
        Figure::of("restore.heavy_pooled_us", &pooled, "us"),
        Figure::plain(
            "restore.heavy_init_speedup",
            boot.median / pooled.median,
            "x",
        )
        .target(Target::AtLeast(50.0)),
    ]
}

/// Waits (sleeping) until the pool's refill thread has filled it again.
fn wait_full(pool: &ShellPool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.available() < POOL_SHELLS {
        assert!(Instant::now() < deadline, "the shell pool does not refill");
        std::thread::sleep(Duration::from_micros(200));
    }
}
