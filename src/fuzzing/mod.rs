//! Drivers for the fuzz targets in `fuzz/` and the tests that replay their
//! corpora (the `fuzzing` feature). Not a stable API: nothing here is
//! needed to use snapvm.
//!
//! - [`hypercalls`]: a real VM driven by an arbitrary hypercall script.
//! - [`net`]: a connection tracker fed arbitrary frames.
//! - [`snapshot_file`]: the snapshot file parser fed from memory.
//! - [`trace_entry`]: the trace cache's entry file parser and encoder.

pub mod hypercalls;
pub mod net;
pub mod snapshot_file;
pub mod trace_entry;
