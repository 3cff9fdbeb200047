//! Choosing a block size: deduplication against metadata overhead.
//!
//! Smaller blocks find more duplicate data but cost more manifest bytes and
//! more objects (each with a 16-byte tag and a per-object cost in the
//! backend). [`block_size_table`] computes, for a set of images (for example
//! memory snapshots of one runtime) and candidate block sizes, what a store
//! would hold. It needs no keys and stores nothing: under one salt two blocks
//! deduplicate exactly when their plaintexts are equal.

use std::collections::HashSet;
use std::fmt;

use super::block::is_zero;
use super::crypto::{sha256, TAG_LEN};
use super::ids::HASH_LEN;
use super::manifest::HEADER_LEN;

/// Bytes one data entry and one zero entry take in a manifest body.
const DATA_ENTRY: u64 = 1 + 4 + 4 + HASH_LEN as u64;
const ZERO_ENTRY: u64 = 1 + 4;

/// One row of a [`block_size_table`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSizeRow {
    /// The block size.
    pub block_size: usize,
    /// Sum of the images' lengths.
    pub logical_bytes: u64,
    /// Distinct non-zero blocks (objects in the store).
    pub unique_blocks: u64,
    /// Bytes of blocks stored: plaintext plus a tag per unique block.
    pub block_bytes: u64,
    /// Bytes of all manifests (clear reference table plus encrypted body).
    pub manifest_bytes: u64,
    /// `logical_bytes / (block_bytes + manifest_bytes)`.
    pub dedup_ratio: f64,
    /// `manifest_bytes / (block_bytes + manifest_bytes)`.
    pub metadata_fraction: f64,
}

/// What storing every image in `images` would cost at each block size.
pub fn block_size_table(images: &[&[u8]], block_sizes: &[usize]) -> Vec<BlockSizeRow> {
    block_sizes
        .iter()
        .filter(|&&bs| bs > 0)
        .map(|&block_size| {
            let mut seen: HashSet<[u8; HASH_LEN]> = HashSet::new();
            let (mut logical, mut block_bytes, mut manifest_bytes) = (0u64, 0u64, 0u64);
            for image in images {
                logical += image.len() as u64;
                let mut refs: HashSet<[u8; HASH_LEN]> = HashSet::new();
                let mut body = 4 + 8 + 4 + 8;
                for chunk in image.chunks(block_size) {
                    if is_zero(chunk) {
                        body += ZERO_ENTRY;
                        continue;
                    }
                    body += DATA_ENTRY;
                    let h = sha256(chunk);
                    refs.insert(h);
                    if seen.insert(h) {
                        block_bytes += (chunk.len() + TAG_LEN) as u64;
                    }
                }
                manifest_bytes +=
                    HEADER_LEN as u64 + refs.len() as u64 * HASH_LEN as u64 + body + TAG_LEN as u64;
            }
            let stored = (block_bytes + manifest_bytes).max(1) as f64;
            BlockSizeRow {
                block_size,
                logical_bytes: logical,
                unique_blocks: seen.len() as u64,
                block_bytes,
                manifest_bytes,
                dedup_ratio: logical as f64 / stored,
                metadata_fraction: manifest_bytes as f64 / stored,
            }
        })
        .collect()
}

/// A [`block_size_table`] formatted as a Markdown table.
pub struct Table<'a>(pub &'a [BlockSizeRow]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| block size | unique blocks | stored MiB | manifest KiB | dedup ratio | metadata |"
        )?;
        writeln!(f, "|---:|---:|---:|---:|---:|---:|")?;
        for r in self.0 {
            writeln!(
                f,
                "| {} KiB | {} | {:.2} | {:.1} | {:.2} | {:.3}% |",
                r.block_size / 1024,
                r.unique_blocks,
                r.block_bytes as f64 / (1 << 20) as f64,
                r.manifest_bytes as f64 / 1024.0,
                r.dedup_ratio,
                r.metadata_fraction * 100.0
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_blocks_count_once() {
        // Two 1 MiB images sharing everything but one 4 KiB page.
        let mut a = vec![0u8; 1 << 20];
        for (i, b) in a.iter_mut().enumerate().take(512 << 10) {
            *b = (i % 251) as u8 + 1;
        }
        let mut b = a.clone();
        b[100_000] ^= 0xff;
        let rows = block_size_table(&[&a, &b], &[4096, 65536]);
        assert_eq!(rows[0].unique_blocks, 128 + 1);
        assert_eq!(rows[1].unique_blocks, 8 + 1);
        assert!(rows[0].dedup_ratio > 3.5 && rows[1].dedup_ratio > 3.5);
        assert!(rows[0].metadata_fraction > rows[1].metadata_fraction);
        let text = Table(&rows).to_string();
        assert!(text.contains("| 4 KiB | 129 |"), "{text}");
    }
}
