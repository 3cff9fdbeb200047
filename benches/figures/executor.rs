//! Executor scaling: how throughput grows from one worker thread to two.
//!
//! - `executor.rps_1worker`, `executor.rps_2workers`: calls per second of
//!   the testguest `counter` function under `Always` (a reset after every
//!   call) by 1 (2) worker threads sharing one `ReadyPool` (the crate's
//!   pool of ready VMs, as the HTTP gateway uses it): each worker borrows
//!   a VM per call and gives it back. Rounds of both are interleaved; each
//!   value is the median round.
//! - `executor.scaling`: `executor.rps_2workers` judged against
//!   `executor.rps_1worker`: the ratio is the scaling, target `>= 1.7`
//!   (two cores; other load on the machine lowers it).

use std::time::{Duration, Instant};

use snapvm::policy::Always;
use snapvm::{GuestProgram, ReadyPool, VmConfig, VmInstance};

use super::{Ctx, Figure, Stats, Target};

/// Measures the scaling figures, or none when KVM is unusable (the VM
/// figures have said so already).
pub fn measure(ctx: &Ctx) -> Vec<Figure> {
    if snapvm::vm::check_kvm().is_err() {
        return Vec::new();
    }
    let path = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("testguest");
    let config = VmConfig::new(GuestProgram::from_file(path).expect("testguest"))
        .memory_size(64 << 20)
        .dirty_tracking(true);
    let ready = VmInstance::new(&config)
        .expect("testguest VM")
        .snapshot()
        .expect("ready snapshot");
    let pool = ReadyPool::new(&config, ready, 2, || Always).expect("ready pool");
    let (rounds, round) = if ctx.quick {
        (3, Duration::from_millis(250))
    } else {
        (7, Duration::from_millis(500))
    };
    let mut one = Vec::new();
    let mut two = Vec::new();
    for _ in 0..rounds {
        one.push(rps(&pool, 1, round));
        two.push(rps(&pool, 2, round));
    }
    let one = Figure::of("executor.rps_1worker", &Stats::of(&mut one), "req/s");
    let two_stats = Stats::of(&mut two);
    vec![
        one.clone(),
        Figure::of("executor.rps_2workers", &two_stats, "req/s"),
        Figure::of("executor.scaling", &two_stats, "req/s")
            .against(&one)
            .target(Target::AtLeast(1.7)),
    ]
}

/// Calls per second of `workers` threads serving from `pool` for `round`.
fn rps(pool: &ReadyPool<Always>, workers: usize, round: Duration) -> f64 {
    let start = Instant::now();
    let deadline = start + round;
    let served: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut served = 0;
                    while Instant::now() < deadline {
                        let mut vm = pool.get().expect("a ready VM");
                        if vm.invoke("counter", b"").is_ok() {
                            served += 1;
                        }
                    }
                    served
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).sum()
    });
    served as f64 / start.elapsed().as_secs_f64()
}
