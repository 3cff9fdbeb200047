//! Polling-mode figures: a warm call that costs no VM exit, and what it
//! costs the host's CPUs.
//!
//! - `invoke.poll_us`: one `PollingVm::invoke("empty", b"")` on a hot
//!   testguest VM (policy `Never`, 10 ms window, calls back to back), timed
//!   one by one; baseline `kvm.exit_us`, target `<= 0.1`.
//! - `invoke.poll_cpu_us`: host CPU time (all threads of this process:
//!   the caller spinning on the result and the vCPU thread spinning in the
//!   guest) per polled call, over blocks of 100 000 back-to-back calls.
//!   Against `kvm.exit_us` as well, so the trade-off reads off one table.
//!   The guest's window is let pass after each block, so the ordinary
//!   calls measured next are not charged for its spinning.
//! - `invoke.exit_us` and `invoke.exit_cpu_us`: the same call through a
//!   `ManagedVm` with the same policy (one exit per call), wall and CPU
//!   time, measured interleaved with the polled calls.

use std::time::{Duration, Instant};

use snapvm::policy::{ManagedVm, Never, PollConfig, PollingVm};
use snapvm::{Snapshot, VmConfig, VmInstance};

use super::{Ctx, Figure, Stats, Target};

/// Polled calls per block: enough (about 0.1 s) that the kernel's
/// accounting of the vCPU thread, which never leaves the guest while hot
/// and is charged at scheduler ticks, is exact to a few per cent.
const POLL_BLOCK: usize = 100_000;
/// Ordinary calls per block.
const EXIT_BLOCK: usize = 200;

/// Measures the polling figures, judged against `kvm.exit_us` in `so_far`.
pub fn measure(ctx: &Ctx, so_far: &[Figure]) -> Vec<Figure> {
    if !super::kvm_usable("polling") {
        return Vec::new();
    }
    let config = super::common::config("testguest").dirty_tracking(true);
    let ready = VmInstance::new(&config)
        .expect("testguest VM")
        .snapshot()
        .expect("ready snapshot");
    let managed = |config: &VmConfig, ready: &Snapshot| {
        ManagedVm::new(
            VmInstance::restore(config, ready).expect("restore"),
            ready.clone(),
            Never,
        )
        .expect("managed VM")
    };
    let mut polled = PollingVm::new(
        managed(&config, &ready),
        PollConfig::new().window(Duration::from_millis(10)),
    )
    .expect("polling VM");
    let mut exiting = managed(&config, &ready);
    // Warm up both (pages faulted in, the vCPU thread hot).
    for _ in 0..2000 {
        polled.invoke("empty", b"").expect("polled call");
    }
    for _ in 0..200 {
        exiting.invoke("empty", b"").expect("call");
    }

    let rounds = ctx.samples(8, 3);
    let (mut poll, mut poll_cpu, mut exit, mut exit_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let cpu = super::common::process_cpu();
        for _ in 0..POLL_BLOCK {
            let start = Instant::now();
            polled.invoke("empty", b"").expect("polled call");
            poll.push(start.elapsed().as_secs_f64() * 1e6);
        }
        poll_cpu.push((super::common::process_cpu() - cpu).as_secs_f64() * 1e6 / POLL_BLOCK as f64);
        // Let the polled guest's window pass: its spinning is not the
        // ordinary calls' cost.
        std::thread::sleep(Duration::from_millis(30));
        let cpu = super::common::process_cpu();
        for _ in 0..EXIT_BLOCK {
            let start = Instant::now();
            exiting.invoke("empty", b"").expect("call");
            exit.push(start.elapsed().as_secs_f64() * 1e6);
        }
        exit_cpu.push((super::common::process_cpu() - cpu).as_secs_f64() * 1e6 / EXIT_BLOCK as f64);
    }
    assert_eq!(polled.resets(), 0, "policy Never: no reset while measuring");
    drop(polled);

    let base = so_far.iter().find(|f| f.name == "kvm.exit_us");
    let against_exit = |figure: Figure| match base {
        Some(base) => figure.against(base),
        None => figure,
    };
    vec![
        against_exit(Figure::of("invoke.poll_us", &Stats::of(&mut poll), "us"))
            .target(Target::AtMost(0.1)),
        against_exit(Figure::of(
            "invoke.poll_cpu_us",
            &Stats::of(&mut poll_cpu),
            "us",
        )),
        against_exit(Figure::of("invoke.exit_us", &Stats::of(&mut exit), "us")),
        against_exit(Figure::of(
            "invoke.exit_cpu_us",
            &Stats::of(&mut exit_cpu),
            "us",
        )),
    ]
}
