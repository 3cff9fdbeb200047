//! A small executor: how the snapvm primitives compose into a server.
//!
//! One function (`counter` of the `testguest` guest by default) is served
//! by a pool of VMs, one worker thread per core. The guest is booted once
//! and its ready state captured as a [`Snapshot`]; each worker restores its
//! own VM from that snapshot (through a [`ShellPool`], so VM creation is
//! off the request path) and wraps it in a [`ManagedVm`] that applies the
//! function's [`RestorePolicy`] after every call. A worker whose VM cannot
//! be brought back to ready restores a new one from the snapshot on the
//! next request (restore on demand). A bounded load loop then prints
//! throughput and p50/p99 latency.
//!
//! ```text
//! cargo run --release --example executor -- [--policy always|never|every:N|garbage:MiB]
//!     [--requests N | --seconds S] [--workers N] [--function NAME] [--input TEXT]
//! ```
//!
//! With `--policy always` (the default) every request starts from the
//! ready state, so `counter` answers 1 every time; with `never` it counts
//! up; with `every:N` it restarts every N requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use snapvm::policy::{Always, EveryN, GuestGarbageAbove, ManagedVm, Never, RestorePolicy};
use snapvm::snapshot::ShellPool;
use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance, VmState};

/// The restore policy chosen on the command line. Each worker builds its
/// own (`build`), so it is a plain value rather than a policy object.
#[derive(Clone, Copy, Debug)]
enum Policy {
    Always,
    Never,
    EveryN(u64),
    GarbageMib(u64),
}

impl Policy {
    fn parse(text: &str) -> Result<Self, String> {
        let number = |n: &str| n.parse::<u64>().map_err(|e| format!("{text}: {e}"));
        match text.split_once(':') {
            None if text == "always" => Ok(Self::Always),
            None if text == "never" => Ok(Self::Never),
            Some(("every", n)) => Ok(Self::EveryN(number(n)?.max(1))),
            Some(("garbage", mib)) => Ok(Self::GarbageMib(number(mib)?)),
            _ => Err(format!(
                "unknown policy {text:?}: always, never, every:N or garbage:MiB"
            )),
        }
    }

    fn build(self) -> Box<dyn RestorePolicy> {
        match self {
            Self::Always => Box::new(Always),
            Self::Never => Box::new(Never),
            Self::EveryN(n) => Box::new(EveryN(n)),
            Self::GarbageMib(mib) => Box::new(GuestGarbageAbove(mib << 20)),
        }
    }
}

/// How much load to offer: shared by all workers.
struct Budget {
    remaining: AtomicU64,
    deadline: Option<Instant>,
}

impl Budget {
    /// Claims one request; false once the budget is spent.
    fn take(&self) -> bool {
        match self.deadline {
            Some(deadline) => Instant::now() < deadline,
            None => self
                .remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
                .is_ok(),
        }
    }
}

/// What one worker did.
#[derive(Default)]
struct WorkerReport {
    latencies: Vec<Duration>,
    errors: u64,
    resets: u64,
    restores: u64,
    last_output: Vec<u8>,
}

/// Everything a worker needs to serve one function.
struct Function<'a> {
    config: &'a VmConfig,
    ready: &'a Snapshot,
    policy: Policy,
    name: &'a str,
    input: &'a [u8],
}

/// One worker: serves `function` until the budget is spent, restoring a VM
/// from the ready snapshot when it starts and whenever its VM is lost.
fn worker(pool: &ShellPool, function: &Function<'_>, budget: &Budget) -> WorkerReport {
    let mut report = WorkerReport::default();
    let mut vm: Option<ManagedVm<Box<dyn RestorePolicy>>> = None;
    while budget.take() {
        let start = Instant::now();
        let managed = match vm.as_mut() {
            Some(managed) => managed,
            None => {
                let restored = pool
                    .restore_with(function.config, function.ready)
                    .and_then(|v| {
                        ManagedVm::new(v, function.ready.clone(), function.policy.build())
                    });
                report.restores += 1;
                match restored {
                    Ok(managed) => vm.insert(managed),
                    Err(e) => {
                        report.errors += 1;
                        if report.errors <= 3 {
                            eprintln!("restore failed: {e}");
                        }
                        continue;
                    }
                }
            }
        };
        let result = managed.invoke(function.name, function.input);
        report.latencies.push(start.elapsed());
        match result {
            Ok(out) => report.last_output = out,
            Err(e) => {
                report.errors += 1;
                if report.errors <= 3 {
                    eprintln!("request failed: {e}");
                }
                // A poisoned VM was reset already; one that is still not
                // ready (its reset failed) is dropped and restored anew.
                if managed.vm().state() != VmState::Ready {
                    report.resets += managed.resets();
                    vm = None;
                }
            }
        }
    }
    report.resets += vm.map_or(0, |managed| managed.resets());
    report
}

struct Args {
    policy: Policy,
    requests: Option<u64>,
    seconds: f64,
    workers: usize,
    function: String,
    input: Vec<u8>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        policy: Policy::Always,
        requests: None,
        seconds: 3.0,
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        function: "counter".into(),
        input: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--policy" => args.policy = Policy::parse(&value()?)?,
            "--requests" => {
                args.requests = Some(value()?.parse().map_err(|e| format!("--requests: {e}"))?)
            }
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--workers" => {
                args.workers = value()?
                    .parse::<usize>()
                    .map_err(|e| format!("--workers: {e}"))?
                    .max(1)
            }
            "--function" => args.function = value()?,
            "--input" => args.input = value()?.into_bytes(),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    if let Err(e) = snapvm::vm::check_kvm() {
        eprintln!("snapvm needs KVM: {e}");
        std::process::exit(2);
    }

    // Boot the guest once and capture its ready state. Dirty tracking lets
    // a reset rewind only the pages a request wrote.
    let path = std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("testguest");
    let config = VmConfig::new(GuestProgram::from_file(&path)?)
        .memory_size(64 << 20)
        .dirty_tracking(true);
    let ready = VmInstance::new(&config)?.snapshot()?;
    // Empty VMs created ahead of time, one per worker (refilled in the
    // background), so restores skip VM creation.
    let pool = ShellPool::new(&config, args.workers)?;

    let function = Function {
        config: &config,
        ready: &ready,
        policy: args.policy,
        name: &args.function,
        input: &args.input,
    };
    let budget = Budget {
        remaining: AtomicU64::new(args.requests.unwrap_or(0)),
        deadline: match args.requests {
            Some(_) => None,
            None => Some(Instant::now() + Duration::from_secs_f64(args.seconds)),
        },
    };
    println!(
        "serving {:?} with policy {:?} on {} workers for {}",
        args.function,
        args.policy,
        args.workers,
        match args.requests {
            Some(n) => format!("{n} requests"),
            None => format!("{} s", args.seconds),
        }
    );

    let start = Instant::now();
    let reports: Vec<WorkerReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.workers)
            .map(|_| scope.spawn(|| worker(&pool, &function, &budget)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect()
    });
    let elapsed = start.elapsed();

    let mut latencies: Vec<Duration> = reports
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    if latencies.is_empty() {
        println!("no requests served");
        return Ok(());
    }
    latencies.sort_unstable();
    let sum = |f: fn(&WorkerReport) -> u64| reports.iter().map(f).sum::<u64>();
    println!(
        "{} requests in {:.2} s: {:.0} requests/s; latency p50 {:.1} µs, p99 {:.1} µs",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e6,
        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
    );
    println!(
        "{} resets, {} VM restores, {} errors",
        sum(|r| r.resets),
        sum(|r| r.restores),
        sum(|r| r.errors)
    );
    for (i, report) in reports.iter().enumerate() {
        let last = &report.last_output;
        let shown = match <[u8; 8]>::try_from(last.as_slice()) {
            Ok(word) => u64::from_le_bytes(word).to_string(),
            Err(_) => format!("{:?}", String::from_utf8_lossy(last)),
        };
        println!(
            "  worker {i}: {} requests, last output {shown}",
            report.latencies.len()
        );
    }
    Ok(())
}
