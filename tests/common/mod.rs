//! Helpers shared by the integration tests and the benchmark report.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use snapvm::{GuestProgram, VmConfig};

/// Path of a guest program built from `guests/<name>`.
pub fn guest_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join(name)
}

/// A config for guest program `name` with the defaults.
pub fn config(name: &str) -> VmConfig {
    VmConfig::new(GuestProgram::from_file(guest_path(name)).expect("guest program builds"))
}

/// Whether KVM is usable. Without it, prints one skip line and returns
/// false — unless `SNAPVM_REQUIRE_KVM` is set, in which case it panics.
pub fn kvm_available(test: &str) -> bool {
    match snapvm::vm::check_kvm() {
        Ok(()) => true,
        Err(e) if std::env::var_os("SNAPVM_REQUIRE_KVM").is_some() => {
            panic!("SNAPVM_REQUIRE_KVM is set but KVM is unusable: {e}")
        }
        Err(e) => {
            // Written to the process's stderr directly: the test harness
            // captures `eprintln!` of passing tests, and a test that passes
            // by skipping must say so in the output.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED {test}: KVM is unavailable ({e}); set SNAPVM_REQUIRE_KVM=1 to fail instead"
            );
            false
        }
    }
}

/// Returns early from a test when KVM is unavailable (see [`kvm_available`]).
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !common::kvm_available(module_path!()) {
            return;
        }
    };
}

/// `len` deterministic pseudo-random bytes (xorshift64), different per seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Asserts that `vm`'s memory equals `reference`'s (a VM restored from the
/// same snapshot and never used), except the pages that may legitimately
/// differ after a reset: the ABI page (new generation and entropy) and the
/// preserved regions.
pub fn compare_with_ready(vm: &snapvm::VmInstance, reference: &snapvm::VmInstance) {
    let preserved: Vec<(u64, u64)> = vm.preserved_regions().to_vec();
    let size = vm.memory_size();
    let mut a = vec![0u8; 2 << 20];
    let mut b = vec![0u8; 2 << 20];
    let mut addr = 0;
    while addr < size {
        vm.read_memory(addr, &mut a).unwrap();
        reference.read_memory(addr, &mut b).unwrap();
        for page in 0..a.len() / 4096 {
            let at = addr + page as u64 * 4096;
            if at == snapvm::abi::ABI_PAGE_ADDR
                || preserved
                    .iter()
                    .any(|&(p, l)| at <= p && p < at + 4096 || (p..p + l).contains(&at))
            {
                continue;
            }
            assert!(
                a[page * 4096..][..4096] == b[page * 4096..][..4096],
                "page {at:#x} differs after reset"
            );
        }
        addr += a.len() as u64;
    }
}

/// CPU time this process used so far (all threads; a thread that is running
/// now is charged up to its last scheduler tick).
pub fn process_cpu() -> std::time::Duration {
    // SAFETY: `usage` is a plain struct for which all-zero bytes are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is valid and writable; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
