//! The operating-system layer: every `unsafe` block of the crate, behind
//! small safe APIs.
//!
//! One file per resource it owns or system interface it wraps, like
//! Wasmtime's `runtime/vm`: the KVM fds with the guest memory registered
//! in them ([`kvm`]), the guest mapping and the token that proves its vCPU
//! is stopped ([`memory`], [`mmap`]), snapshot image mappings ([`mmap`]),
//! files opened without following links ([`fs`]), userfaultfd ([`uffd`]),
//! the timeout timers and their signal ([`timer`], [`signal`]), clocks
//! ([`clock`]), TAP devices ([`tap`]) and `poll(2)` ([`poll`]). Each
//! `unsafe` block carries a `// SAFETY:` comment that argues from this
//! layer; the two rules it takes from outside are written down where they
//! are relied on: nothing writes a snapshot file while it is mapped
//! ([`mmap::FileMap`]), and a polling caller's handle on guest memory
//! stays out of a [`memory::Stopped`]'s way. Everything above this layer
//! is safe Rust.
//!
//! This module uses nothing else of the crate (only the ABI crate's layout
//! constants), so every other module may use it.

pub(crate) mod clock;
pub(crate) mod fs;
pub(crate) mod kvm;
pub(crate) mod memory;
pub(crate) mod mmap;
pub(crate) mod poll;
pub(crate) mod signal;
pub(crate) mod tap;
pub(crate) mod timer;
pub(crate) mod uffd;
