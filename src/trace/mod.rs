//! Carrying what one short-lived VM learned into the next one.
//!
//! Two kinds of trace: the *working set* a restored VM touched (host side,
//! used to prefetch memory on the next restore of the same snapshot:
//! [`snapshot::WorkingSet`](crate::snapshot::WorkingSet)) and *profiles* a
//! guest exports for its successors (guest side, [`ProfileScope`]). Both
//! live in a [`TraceCache`], keyed so that an entry is never applied to the
//! wrong code or tenant.

mod cache;
pub(crate) mod ext;
mod profile;

#[cfg(feature = "fuzzing")]
pub(crate) use cache::{encode_entry_file, parse_entry_file};
pub use cache::{CodeId, TraceCache, TraceError, TraceKey, TraceKind, MAX_KEY_LEN};
pub use profile::{ProfileScope, DEFAULT_RUNTIME};
