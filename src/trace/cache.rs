//! The trace cache: keyed, bounded, checksummed entries.
