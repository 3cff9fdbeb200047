//! The quickstart guest: a few small functions used by the README, the
//! quickstart example and the benchmark report.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use snapvm_guest::Exports;

snapvm_guest::entry!(init);

fn init(exports: &mut Exports) {
    exports
        .export("empty", empty)
        .export("echo", echo)
        .export("reverse", reverse)
        .export("greet", greet)
        .export_typed("sum_point", sum_point);
}

/// A small struct for typed calls (`VmInstance::call`).
#[derive(serde::Deserialize)]
struct Point {
    x: i32,
    y: i32,
}

/// Adds a point's coordinates: the typed counterpart of `empty` in the
/// benchmark report (`invoke.typed_us`).
fn sum_point(p: Point) -> Result<i64, snapvm_guest::GuestError> {
    Ok(i64::from(p.x) + i64::from(p.y))
}

/// Returns nothing: measures the bare invoke round trip.
fn empty(_input: &[u8]) -> Vec<u8> {
    Vec::new()
}

/// Returns its input.
fn echo(input: &[u8]) -> Vec<u8> {
    input.to_vec()
}

/// Returns its input reversed.
fn reverse(input: &[u8]) -> Vec<u8> {
    input.iter().rev().copied().collect()
}

/// Greets by name, asking the host for the greeting word.
fn greet(input: &[u8]) -> Vec<u8> {
    snapvm_guest::info!("greeting {} bytes of name", input.len());
    let mut out = snapvm_guest::host::call("greeting", b"").unwrap_or_else(|_| b"Hello".to_vec());
    out.extend_from_slice(b", ");
    out.extend_from_slice(input);
    out.push(b'!');
    out
}
