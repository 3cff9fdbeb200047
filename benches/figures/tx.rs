//! Transaction figures: the rewind to a transaction's start, and what a
//! retried transaction costs beside a transaction that succeeds at once.
//!
//! All on a 64 MiB `txguest` VM with `dirty_tracking(true)`, restored
//! from its ready snapshot and rewound to it (untimed) after every
//! sample, as a `ManagedVm` under `Always` does. The guest function
//! `pages [16, n]` begins a transaction, writes one byte into each of 16
//! distinct 4 KiB pages, and aborts until attempt `n`, then commits; the
//! runner retries at once (`RetryPolicy::no_backoff`).
//!
//! - `tx.rewind_us`: the rewind before attempt 2 of `pages [16, 2]`, as
//!   the runner reports it (`Attempt::rewind`): dirty log, the 16 pages
//!   plus the stack and ABI page copied back, registers. Baseline
//!   `reset.16page_us` of this run (a request plus the reset to ready after
//!   it dirtied 16 pages); target `<= 1.2`.
//! - `tx.reset_us`: the (otherwise untimed) reset to ready after each
//!   `pages [16, 2]` sample — the same dirty-page machinery over the same
//!   pages, without a call — and `tx.rewind_us/reset`, the rewind judged
//!   against it (no target: a like-for-like view beside the one the
//!   design names).
//! - `tx.1attempt_us`, `tx.3attempts_us`: `Transaction::invoke` of
//!   `pages [16, 1]` (commits at once) and `pages [16, 3]` (commits on
//!   attempt 3), interleaved in blocks.
//! - `tx.retry_overhead`: median `tx.3attempts_us` ÷ (3 × median
//!   `tx.1attempt_us`), target `<= 1.3`; the spread is the same ratio of
//!   the p10s and of the p90s.

use std::path::Path;
use std::time::Instant;

use snapvm::policy::{RetryPolicy, Transaction};
use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance};

use super::{Ctx, Figure, Stats, Target};

const MEMORY: u64 = 64 << 20;
/// Samples of each figure per interleaved block.
const BLOCK: usize = 10;

/// Measures the transaction figures, judged against `reset.16page_us` in
/// `so_far`; none when KVM is unusable.
pub fn measure(ctx: &Ctx, so_far: &[Figure]) -> Vec<Figure> {
    if !super::kvm_usable("transaction") {
        return Vec::new();
    }
    let path = Path::new(env!("SNAPVM_GUESTS_DIR")).join("txguest");
    let program = GuestProgram::from_file(&path)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    let config = VmConfig::new(program)
        .memory_size(MEMORY)
        .dirty_tracking(true);
    let ready = VmInstance::new(&config)
        .expect("txguest VM")
        .snapshot()
        .expect("ready snapshot");
    let mut vm = VmInstance::restore(&config, &ready).expect("restore");
    let tx = Transaction::new().retry(RetryPolicy::default().max_attempts(3).no_backoff());

    // Warm up: fault in every page the transactions touch.
    for _ in 0..30 {
        sample(&tx, &mut vm, &ready, 3);
    }
    let rounds = ctx.samples(40, 8);
    let (mut rewind, mut reset, mut one, mut three) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        for _ in 0..BLOCK {
            let (_, rewinds, reset_us) = sample(&tx, &mut vm, &ready, 2);
            rewind.push(rewinds[0]);
            reset.push(reset_us);
        }
        for _ in 0..BLOCK {
            one.push(sample(&tx, &mut vm, &ready, 1).0);
        }
        for _ in 0..BLOCK {
            three.push(sample(&tx, &mut vm, &ready, 3).0);
        }
    }
    let (rewind, reset, one, three) = (
        Stats::of(&mut rewind),
        Stats::of(&mut reset),
        Stats::of(&mut one),
        Stats::of(&mut three),
    );
    let reset_figure = Figure::of("tx.reset_us", &reset, "us");
    let rewind_vs_reset = Figure::of("tx.rewind_us/reset", &rewind, "us").against(&reset_figure);
    let mut rewind_figure = Figure::of("tx.rewind_us", &rewind, "us").target(Target::AtMost(1.2));
    if let Some(base) = so_far.iter().find(|f| f.name == "reset.16page_us") {
        rewind_figure = rewind_figure.against(base);
    }
    let mut overhead = Figure::plain("tx.retry_overhead", three.median / (3.0 * one.median), "x")
        .target(Target::AtMost(1.3));
    overhead.spread = Some((three.p10 / (3.0 * one.p10), three.p90 / (3.0 * one.p90)));
    vec![
        rewind_figure,
        reset_figure,
        rewind_vs_reset,
        Figure::of("tx.1attempt_us", &one, "us"),
        Figure::of("tx.3attempts_us", &three, "us"),
        overhead,
    ]
}

/// One transaction of `pages [16, commit_on]`: its time, its rewinds, and
/// the time of the reset to `ready` after it (µs).
fn sample(
    tx: &Transaction,
    vm: &mut VmInstance,
    ready: &Snapshot,
    commit_on: u8,
) -> (f64, Vec<f64>, f64) {
    let start = Instant::now();
    let done = tx
        .invoke(vm, ready, "pages", &[16, commit_on])
        .expect("transaction");
    let us = start.elapsed().as_secs_f64() * 1e6;
    assert_eq!(done.attempts.len(), usize::from(commit_on));
    let rewinds = done
        .attempts
        .iter()
        .filter_map(|a| a.rewind.map(|d| d.as_secs_f64() * 1e6))
        .collect();
    let start = Instant::now();
    vm.restore_in_place(ready).expect("reset");
    (us, rewinds, start.elapsed().as_secs_f64() * 1e6)
}
