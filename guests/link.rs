// Shared build script of the guest programs: link a static, non-PIE ELF with
// no C runtime. A guest crate outside this repository uses the same four
// lines (see docs/guest-guide.md).
fn main() {
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
