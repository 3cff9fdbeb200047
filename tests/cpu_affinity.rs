//! Restores must not depend on the physical CPU a VM or snapshot happened
//! to be created on. KVM reports the APIC id of the CPU the process runs on
//! in the CPUID it offers, and refuses to give a vCPU that has already run
//! (a pooled shell, a poisoned VM rewound in place) a different CPUID.
//!
//! Each direction runs two child processes of this test binary, each pinned
//! to one core before its first KVM call: one takes a snapshot and saves
//! it, the other (on the other core) restores it through a `ShellPool`, into
//! new VMs, and in place into a poisoned VM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use snapvm::snapshot::{RestoreStrategy, ShellPool};
use snapvm::{Snapshot, VmInstance, VmState};

/// Set in a child process: `snapshot` or `restore`.
const ROLE: &str = "SNAPVM_CPU_AFFINITY_ROLE";
/// Set in a child process: the core to pin to.
const CORE: &str = "SNAPVM_CPU_AFFINITY_CORE";
/// Set in a child process: the snapshot file.
const FILE: &str = "SNAPVM_CPU_AFFINITY_FILE";

/// Pooled restores per direction.
const POOLED_RESTORES: u64 = 20;

fn counter(vm: &mut VmInstance) -> u64 {
    u64::from_le_bytes(vm.invoke("counter", b"").unwrap().try_into().unwrap())
}

/// The cores this process may run on.
fn allowed_cores() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is plain data for which all zeroes is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, writable `cpu_set_t` of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(
        rc,
        0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE, inside `set`.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Pins the calling thread (and the threads it starts later) to `core`.
fn pin(core: usize) {
    // SAFETY: `cpu_set_t` is plain data for which all zeroes is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` comes from `allowed_cores`, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: `set` is a live `cpu_set_t` of the size passed; KVM and the
    // test only read it.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: sched_getcpu has no preconditions.
    assert_eq!(unsafe { libc::sched_getcpu() }, core as i32);
}

/// Runs `role` in a child process of this test binary pinned to `core`.
fn run_child(role: &str, core: usize, file: &Path) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(CORE, core.to_string())
        .env(FILE, file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{role} on core {core} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(&format!("{role} done on core {core}")),
        "{role} on core {core} did not run:\n{stdout}\n{stderr}"
    );
}

#[test]
fn restores_do_not_depend_on_the_core_the_snapshot_was_taken_on() {
    require_kvm!();
    let cores = allowed_cores();
    let [a, b, ..] = cores[..] else {
        eprintln!("skipped: this process may run on one core only ({cores:?})");
        return;
    };
    let dir = std::env::temp_dir().join(format!("snapvm-cpu-affinity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [(a, b), (b, a)] {
        let file: PathBuf = dir.join(format!("core{from}.snap"));
        run_child("snapshot", from, &file);
        run_child("restore", to, &file);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The body of a child process (does nothing in a normal test run).
#[test]
fn child_process() {
    let Some(role) = std::env::var_os(ROLE) else {
        return;
    };
    let core: usize = std::env::var(CORE).unwrap().parse().unwrap();
    let file = PathBuf::from(std::env::var_os(FILE).unwrap());
    // Before anything in this process opens KVM.
    pin(core);
    let config = common::config("testguest");
    match role.to_str().unwrap() {
        "snapshot" => {
            let mut vm = VmInstance::new(&config).unwrap();
            assert_eq!(counter(&mut vm), 1);
            vm.snapshot().unwrap().save(&file).unwrap();
        }
        "restore" => restore_everywhere(&config, &file),
        other => panic!("unknown role {other}"),
    }
    println!("{} done on core {core}", role.to_str().unwrap());
}

/// Restores the snapshot in `file` (taken on another core, counter at 1)
/// every way there is, with VMs and shells created on this core.
fn restore_everywhere(config: &snapvm::VmConfig, file: &Path) {
    let snap = Snapshot::load(file).unwrap();

    // Pooled: every restore takes a shell that was created here and ran.
    let pool = ShellPool::for_snapshot(config, &snap, 2).unwrap();
    for i in 0..POOLED_RESTORES {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.available() == 0 {
            assert!(Instant::now() < deadline, "the pool never refilled");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut vm = pool
            .restore(&snap)
            .unwrap_or_else(|e| panic!("pooled restore {i}: {e} ({e:?})"));
        assert_eq!(counter(&mut vm), 2, "pooled restore {i}");
    }

    // New VMs, both strategies.
    for strategy in [RestoreStrategy::Eager, RestoreStrategy::Lazy] {
        let mut vm = VmInstance::restore_with(config, &snap, strategy)
            .unwrap_or_else(|e| panic!("{strategy:?}: {e} ({e:?})"));
        assert_eq!(counter(&mut vm), 2, "{strategy:?}");
    }

    // In place, into a poisoned VM booted here (its vCPU has run).
    let mut vm = VmInstance::new(config).unwrap();
    assert_eq!(counter(&mut vm), 1);
    assert!(vm.invoke("panic", b"").is_err());
    assert_eq!(vm.state(), VmState::Poisoned);
    vm.restore_in_place(&snap)
        .unwrap_or_else(|e| panic!("in place: {e} ({e:?})"));
    assert_eq!(vm.state(), VmState::Ready);
    assert_eq!(counter(&mut vm), 2);

    // And a pooled VM, poisoned, rewound in place again.
    let mut vm = pool.restore(&snap).unwrap();
    assert!(vm.invoke("panic", b"").is_err());
    vm.restore_in_place(&snap)
        .unwrap_or_else(|e| panic!("pooled, in place: {e} ({e:?})"));
    assert_eq!(counter(&mut vm), 2);
}
