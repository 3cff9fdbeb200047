//! The operating-system layer: `unsafe` system calls behind small safe
//! APIs.
//!
//! One file per resource it owns or system interface it wraps, like
//! Wasmtime's `runtime/vm`: files opened without following links
//! ([`fs`]), the timeout timers and their signal ([`timer`], [`signal`]),
//! clocks ([`clock`]), TAP devices ([`tap`]) and `poll(2)` ([`poll`]).
//! Each `unsafe` block carries a `// SAFETY:` comment that argues from
//! this layer alone; everything above it is safe Rust.
//!
//! This module uses nothing else of the crate, so every other module may
//! use it.

pub(crate) mod clock;
pub(crate) mod fs;
pub(crate) mod poll;
pub(crate) mod signal;
pub(crate) mod tap;
pub(crate) mod timer;
