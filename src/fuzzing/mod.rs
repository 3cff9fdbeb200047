//! Drivers for the fuzz targets in `fuzz/` and the tests that replay their
//! corpora (the `fuzzing` feature). Not a stable API: nothing here is
//! needed to use snapvm.
//!
//! - [`hypercalls`]: a real VM driven by an arbitrary hypercall script.
//! - [`net`]: a connection tracker fed arbitrary frames.

pub mod hypercalls;
pub mod net;
