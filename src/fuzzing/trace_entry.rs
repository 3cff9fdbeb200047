//! The `trace_entry` fuzz target's entry points: the trace cache's entry
//! file parser and encoder. Not a stable API.

use crate::trace::TraceKey;

/// Parses the bytes of an entry file exactly as
/// [`TraceCache::open`](crate::trace::TraceCache::open) and
/// [`TraceCache::get`](crate::trace::TraceCache::get) do: the key and value,
/// or `None` for a file they drop.
pub fn parse(bytes: &[u8]) -> Option<(TraceKey, Vec<u8>)> {
    crate::trace::parse_entry_file(bytes)
}

/// The bytes of the entry file the cache writes for `key` and `value`.
pub fn encode(key: &TraceKey, value: &[u8]) -> Vec<u8> {
    crate::trace::encode_entry_file(key, value)
}
