//! Resource hygiene: VMs release every fd and their memory when dropped.
//! In its own test binary so no other test creates VMs concurrently.

mod common;

use snapvm::VmInstance;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[test]
fn a_thousand_vms_release_every_fd_and_their_memory() {
    require_kvm!();
    let config = common::config("testguest");
    // Warm up once so process-wide caches (KVM handle, CPUID) exist.
    VmInstance::new(&config)
        .unwrap()
        .invoke("echo", b"x")
        .unwrap();
    let (fds, rss) = (open_fds(), rss_kib());
    for i in 0..1000u32 {
        let mut vm = VmInstance::new(&config).unwrap();
        assert_eq!(
            vm.invoke("echo", &i.to_le_bytes()).unwrap(),
            i.to_le_bytes()
        );
    }
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB over 1000 VMs");
}
