//! Fixed-size chunking: how a data set is cut into blocks.
//!
//! A data set of `n` bytes with block size `b` becomes `ceil(n / b)` blocks;
//! every block but the last is exactly `b` bytes, the last holds the rest.
//! The empty data set has no blocks. A block whose bytes are all zero is not
//! stored at all: the manifest records it as a zero entry.

use std::io::{self, Read};

/// The default block size: 64 KiB, chosen from measurements on snapshot
/// images (the table in `docs/store.md`).
pub const DEFAULT_BLOCK_SIZE: usize = 64 * 1024;
/// The largest block size a store accepts (and a manifest may declare).
pub const MAX_BLOCK_SIZE: usize = 16 * 1024 * 1024;

/// Whether every byte of `block` is zero.
pub fn is_zero(block: &[u8]) -> bool {
    // OR-fold in fixed chunks: vectorizes, and still stops early on the first
    // non-zero chunk (the common case for data blocks).
    let mut chunks = block.chunks_exact(256);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Fills `buf` from `r`, stopping early only at end of input. Returns the
/// number of bytes read (less than `buf.len()` only at end of input).
pub fn read_full(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        for len in [0, 1, 255, 256, 257, 4096, 65536 + 3] {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b));
            for pos in [0, len / 2, len.saturating_sub(1)] {
                if len > 0 {
                    b[pos] = 1;
                    assert!(!is_zero(&b), "len {len} pos {pos}");
                    b[pos] = 0;
                }
            }
        }
    }

    #[test]
    fn read_full_handles_short_reads() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(3);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data: Vec<u8> = (0..100).collect();
        let mut r = Trickle(&data);
        let mut buf = [0u8; 64];
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 64);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 36);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 0);
    }
}
