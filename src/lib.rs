//! # snapvm
//!
//! Embeddable KVM micro-VMs for building serverless executors: run other
//! people's code in a real hardware-isolated VM, call its functions with
//! bytes in and bytes out, and get every guest failure back as a typed error.
//!
//! snapvm is a library, not a service. Your executor owns threads,
//! scheduling and I/O; snapvm gives it primitives that compose:
//!
//! - [`VmInstance`] — a KVM VM with one vCPU running a guest program built
//!   with the `snapvm-guest` crate. Guest code runs at CPL3 in 64-bit mode;
//!   faults, panics and timeouts come back as [`VmError`] values.
//! - [`Snapshot`] — a VM captured in its ready state (after init) and
//!   restored far faster than booting: into a new VM, into a pre-created
//!   shell from a [`snapshot::ShellPool`], or in place. Every restore gives
//!   the guest fresh entropy and a new [`Generation`], so copies are not
//!   clones.
//! - [`RestorePolicy`] and [`ManagedVm`] — after every call, keep the VM or
//!   rewind it to its ready state: single-request isolation, garbage
//!   collection by restore, or every N calls, keeping the state the guest
//!   asked to preserve (except under [`Always`](policy::Always), whose
//!   requests share nothing unless declared with
//!   [`keeping_preserved`](RestorePolicy::keeping_preserved)). A reset
//!   copies back only the pages the call wrote.
//!   [`ReadyPool`] hands out ready `ManagedVm`s of one snapshot to any
//!   number of worker threads, restoring new ones into warm shells.
//!   [`PollingVm`] keeps a managed VM's guest spinning between calls, so
//!   a warm call costs no VM exit.
//! - [`store::ConvergentStore`] — data sets (such as snapshot images) kept as
//!   fixed-size blocks under convergent encryption: each block is encrypted
//!   with a key derived from its own content and a salt, so identical blocks
//!   are stored once across data sets, owners and machines sharing a
//!   backend, while the backend holds only ciphertext. A salt set
//!   ([`store::Redundancy`]) bounds how many ciphertexts one plaintext may
//!   have. Backends: a local directory ([`store::FsBackend`]), memory
//!   ([`store::MemoryBackend`]) and, with the `s3` feature, any
//!   S3-compatible object store (`store::S3Backend`). The store depends on
//!   nothing else in the crate but the [`ErrorKind`] vocabulary.
//! - [`net`] — guest networking on a host TAP device
//!   ([`VmConfig::network`]) and connection recovery: the
//!   [`net::ConnTracker`] follows every TCP connection, and
//!   [`VmInstance::terminate_connections`] ends them on both sides, with
//!   the exact sequence numbers each side expects, before a halt, snapshot
//!   or migration. See `docs/networking.md`.
//!
//! The crate root re-exports the types most programs name (the VM, its
//! config and errors, snapshots, the managed wrappers, the call surface,
//! the store's entry points); everything else lives at its module path:
//! `snapvm::policy::Always`, `snapvm::snapshot::ShellPool`,
//! `snapvm::store::FsBackend`, `snapvm::vm::InterruptHandle`.
//!
//! ## Quick start
//!
//! ```no_run
//! use snapvm::{GuestProgram, VmConfig, VmInstance};
//!
//! # fn main() -> Result<(), snapvm::Error> {
//! // A static ELF built from a `snapvm-guest` program (docs/guest-guide.md).
//! let program = GuestProgram::from_file("guest/target/release/my-guest")?;
//! let config = VmConfig::new(program)
//!     .host_function("greeting", |_| Ok(b"Hello".to_vec()));
//!
//! // Boots the VM and runs the guest's init until it is ready.
//! let mut vm = VmInstance::new(&config)?;
//! let out = vm.invoke("greet", b"world")?;
//! assert_eq!(out, b"Hello, world!");
//!
//! // Capture the ready state once; serve each request from a fresh copy.
//! let ready = vm.snapshot()?;
//! let mut copy = VmInstance::restore(&config, &ready)?;
//! copy.invoke("greet", b"again")?;
//! # Ok(()) }
//! ```
//!
//! ## Concepts
//! - **Ready state**: a VM whose guest finished its init function. Every
//!   call starts from a ready VM.
//! - **Poisoned**: a guest that panicked, faulted, timed out or broke the
//!   protocol cannot be resumed; see [`VmState`] and [`VmError::poisons`].
//! - **Full and diff snapshots**: a full snapshot stores every non-zero
//!   page; a diff ([`VmInstance::snapshot_diff`]) stores the pages written
//!   since its base. See the [`snapshot`] module and `docs/snapshots.md`.
//! - **Transactions**: a guest marks part of a function as a transaction
//!   (`snapvm_guest::tx`); [`policy::Transaction`] judges each attempt with
//!   a [`policy::SuccessCriteria`] and retries failed ones by rewinding the
//!   VM to the transaction's start. See `docs/transactions.md`.
//! - **One call surface**: [`Invoke`] gives [`VmInstance`], [`ManagedVm`],
//!   [`PollingVm`] and [`policy::PooledVm`] the same call methods for
//!   generic executor code; [`Func`] and [`TypedFunc`] are functions
//!   resolved once and called without the name lookup. See
//!   `docs/executor.md`.
//! - **Guest ABI**: [`abi`] is the single definition of the memory layout,
//!   ports and shared structures, compiled by host and guest alike.
//!
//! ## Requirements
//! Linux on x86-64 with read/write access to `/dev/kvm`. [`vm::check_kvm`]
//! tells whether KVM is usable and, if not, how to fix it. Timeouts use the
//! real-time signal [`vm::timeout_signal`]; do not use it elsewhere in the
//! host process.
//!
//! ## Cargo features
//! - `serde` (on by default): typed calls, [`VmInstance::call`],
//!   [`Invoke::call`] and [`TypedFunc`], with
//!   inputs and outputs encoded with postcard (the guest exports them with
//!   `snapvm-guest`'s `serde` feature and `Exports::export_typed`).
//! - `fuzzing` (off by default): `snapvm::fuzzing`, the drivers of the fuzz
//!   targets in `fuzz/`. Not a stable API.
//! - `s3` (off by default): `store::S3Backend`, an S3-compatible backend for
//!   the store built on the `object_store` crate.

mod call;
mod combinator;
pub mod error;
mod error_kind;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod instance;
pub mod net;
pub mod policy;
pub mod snapshot;
pub mod store;
mod sys;
pub mod trace;
mod tx;
pub mod vm;

/// The host/guest ABI, shared with the `snapvm-guest` crate (defined in
/// the `snapvm-abi` crate).
///
// The empty line ends the paragraph: rustdoc appends the crate's own docs.
#[doc(inline)]
pub use snapvm_abi as abi;

#[cfg(feature = "serde")]
pub use call::TypedFunc;
pub use call::{Func, Invoke, InvokeError};
pub use error::{Error, Result};
pub use error_kind::ErrorKind;
pub use instance::{Features, VmInstance};
pub use policy::{
    ManagedVm, PollConfig, PollingVm, ReadyPool, RestorePolicy, SuccessCriteria, Transaction,
    TxError,
};
pub use snapshot::{Snapshot, SnapshotError};
pub use store::{ConvergentStore, StoreConfig, StoreError};
pub use vm::{CancelToken, Generation, GuestProgram, HostCaller, VmConfig, VmError, VmState};
