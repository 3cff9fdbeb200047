//! Builds the guest programs in `guests/` so that tests, examples and
//! benches find them at `env!("SNAPVM_GUESTS_DIR")`.
//!
//! The guests are built by a nested `cargo build` with its own target
//! directory (sharing the outer one would deadlock on its lock) and without
//! the flags meant for the host build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guests = manifest_dir.join("guests");
    println!("cargo:rerun-if-changed=guests");
    println!("cargo:rerun-if-changed=guest/src");
    println!("cargo:rerun-if-changed=guest/include");
    println!("cargo:rerun-if-changed=guest/Cargo.toml");
    println!("cargo:rerun-if-changed=abi/src");
    println!("cargo:rerun-if-changed=abi/Cargo.toml");
    println!("cargo:rerun-if-env-changed=SNAPVM_SKIP_GUEST_BUILD");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("guests-target");
    let bin_dir = target_dir.join("release");
    println!("cargo:rustc-env=SNAPVM_GUESTS_DIR={}", bin_dir.display());

    // docs.rs and packaged builds have no guest sources (or no network).
    if !guests.join("Cargo.toml").exists()
        || env::var_os("SNAPVM_SKIP_GUEST_BUILD").is_some()
        || env::var_os("DOCS_RS").is_some()
    {
        return;
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the guest programs");
    assert!(
        status.success(),
        "building the guest programs in guests/ failed"
    );
    build_c_guest(&manifest_dir, &bin_dir, &out_dir);
}

/// Compiles the C guest `guests/cguest/guest.c` and links it with the
/// static runtime library the nested build made (`libsnapvm_guest_c.a`)
/// into `cguest`, the way docs/guest-guide.md tells a C programmer to: no C
/// library, a freestanding compile, a static non-PIE link without start
/// files.
fn build_c_guest(manifest_dir: &Path, bin_dir: &Path, out_dir: &Path) {
    let source = manifest_dir.join("guests/cguest/guest.c");
    let mut build = cc::Build::new();
    build
        .file(&source)
        .include(manifest_dir.join("guest/include"))
        .out_dir(out_dir.join("cguest-obj"))
        .cargo_metadata(false)
        .opt_level(2)
        .pic(false)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true);
    for flag in [
        "-ffreestanding",
        "-fno-stack-protector",
        "-fno-pic",
        "-fno-pie",
    ] {
        build.flag(flag);
    }
    let objects = build.compile_intermediates();
    let mut link = build.get_compiler().to_command();
    link.args([
        "-nostdlib",
        "-nostartfiles",
        "-static",
        "-no-pie",
        "-Wl,--gc-sections",
        "-o",
    ])
    .arg(bin_dir.join("cguest"))
    .args(&objects)
    .arg(bin_dir.join("libsnapvm_guest_c.a"));
    let status = link.status().expect("failed to run the C compiler to link");
    assert!(status.success(), "linking the C guest failed: {link:?}");
}
