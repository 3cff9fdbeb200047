//! Round trips against a naive oracle, for any bytes, block size and salt.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use proptest::prelude::*;
use snapvm::store::{
    ConvergentStore, Entry, FsBackend, ManifestKey, MemoryBackend, Namespace, PutInfo, Redundancy,
    StoreConfig,
};

/// The naive model of a put: cut into blocks, drop all-zero ones, count the
/// distinct rest.
struct Oracle {
    blocks: u64,
    zero_blocks: u64,
    distinct: u64,
}

fn oracle(data: &[u8], block_size: usize) -> Oracle {
    let mut distinct = HashSet::new();
    let mut o = Oracle {
        blocks: 0,
        zero_blocks: 0,
        distinct: 0,
    };
    for chunk in data.chunks(block_size) {
        o.blocks += 1;
        if chunk.iter().all(|&b| b == 0) {
            o.zero_blocks += 1;
        } else {
            distinct.insert(chunk.to_vec());
        }
    }
    o.distinct = distinct.len() as u64;
    o
}

fn config(block_size: usize, threads: usize, salt_index: u32) -> StoreConfig {
    StoreConfig {
        block_size,
        ingest_threads: threads,
        queue_blocks: 2,
        redundancy: Redundancy::copies(4).with_secret([0x5a; 32]),
        salt_selector: Arc::new(move |_: &PutInfo<'_>, _: u32| salt_index),
        ..StoreConfig::default()
    }
}

/// Data with runs of zeros and repeated blocks, so dedup and zero entries
/// are exercised, not only random bytes.
fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..3000),
        (1usize..8, 0usize..700).prop_map(|(pattern, len)| {
            (0..len)
                .map(|i| {
                    if (i / 37) % pattern == 0 {
                        0
                    } else {
                        (i % pattern) as u8
                    }
                })
                .collect()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_matches_oracle(
        data in data_strategy(),
        block_size in prop_oneof![1usize..70, Just(256usize), Just(4096usize)],
        threads in 1usize..=3,
        salt_index in 0u32..4,
    ) {
        let backend = MemoryBackend::new();
        let store = ConvergentStore::new(
            &config(block_size, threads, salt_index),
            backend.clone(),
            ManifestKey::from_bytes([1; 32]),
        ).unwrap();
        let put = store.put(&data[..], b"m").unwrap();
        let o = oracle(&data, block_size);
        prop_assert_eq!(put.len, data.len() as u64);
        prop_assert_eq!(put.blocks, o.blocks);
        prop_assert_eq!(put.zero_blocks, o.zero_blocks);
        prop_assert_eq!(put.new_blocks, o.distinct);
        prop_assert_eq!(backend.count(Namespace::Blocks) as u64, o.distinct);
        prop_assert_eq!(store.get_bytes(&put.manifest).unwrap(), data.clone());

        // The Read + Seek view agrees, from any offset.
        let mut r = store.reader(&put.manifest).unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        prop_assert_eq!(&all, &data);
        if !data.is_empty() {
            let at = data.len() / 3;
            r.seek(SeekFrom::Start(at as u64)).unwrap();
            let mut tail = Vec::new();
            r.read_to_end(&mut tail).unwrap();
            prop_assert_eq!(&tail[..], &data[at..]);
        }

        // Repeating the put stores nothing new but the manifest.
        let again = store.put(&data[..], b"m").unwrap();
        prop_assert_eq!(again.new_blocks, 0);
        prop_assert_eq!(backend.count(Namespace::Blocks) as u64, o.distinct);
        prop_assert!(store.verify().unwrap().is_clean());
    }
}

#[test]
fn manifest_entries_follow_fixed_chunking() {
    let mut data = vec![0u8; 10_000];
    data[5000..6000].fill(9);
    let store = ConvergentStore::new(
        &config(4096, 2, 0),
        MemoryBackend::new(),
        ManifestKey::from_bytes([1; 32]),
    )
    .unwrap();
    let put = store.put_bytes(&data, b"").unwrap();
    let m = store.manifest(&put.manifest).unwrap();
    assert_eq!((m.block_size, m.total_len), (4096, 10_000));
    let lens: Vec<u32> = m.entries.iter().map(Entry::len).collect();
    assert_eq!(lens, vec![4096, 4096, 1808]);
    assert!(matches!(m.entries[0], Entry::Zero { .. }));
    assert!(matches!(m.entries[1], Entry::Data { .. }));
    assert!(matches!(m.entries[2], Entry::Zero { .. }));
}

#[test]
fn large_stream_on_disk_round_trips_with_bounded_memory() {
    // 24 MiB through a reader that never holds more than one buffer: the
    // store must not need the whole input in memory.
    struct Gen {
        left: u64,
        state: u64,
    }
    impl Read for Gen {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.left as usize).min(10_000);
            for b in &mut buf[..n] {
                self.state = self
                    .state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (self.state >> 56) as u8;
            }
            self.left -= n as u64;
            Ok(n)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let store = ConvergentStore::new(
        &config(64 * 1024, 2, 1),
        FsBackend::open(dir.path()).unwrap(),
        ManifestKey::from_bytes([2; 32]),
    )
    .unwrap();
    let len = 24 << 20;
    let put = store
        .put(
            Gen {
                left: len,
                state: 7,
            },
            b"big",
        )
        .unwrap();
    assert_eq!(put.len, len);
    assert_eq!(put.new_blocks, 384);

    let mut expected = Vec::new();
    Gen {
        left: len,
        state: 7,
    }
    .read_to_end(&mut expected)
    .unwrap();
    let mut out = Vec::new();
    assert_eq!(store.get(&put.manifest, &mut out).unwrap(), len);
    assert!(out == expected);
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id, listed[0].len, &listed[0].metadata[..]),
        (put.manifest, len, &b"big"[..])
    );
}

/// The block-size table (`store::sizing`), on images named by
/// `SNAPVM_STORE_IMAGES` (colon-separated paths) when set — run with
/// `--nocapture` to read it — else on ten synthetic "snapshots": one base
/// image with a few scattered 4 KiB pages changed in each.
#[test]
fn block_size_table_for_images() {
    use snapvm::store::sizing::{block_size_table, Table};
    let sizes = [4096, 16384, 65536, 262144, 1 << 20];
    if let Ok(paths) = std::env::var("SNAPVM_STORE_IMAGES") {
        let images: Vec<Vec<u8>> = paths
            .split(':')
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        let refs: Vec<&[u8]> = images.iter().map(|i| &i[..]).collect();
        println!("{}", Table(&block_size_table(&refs, &sizes)));
        return;
    }
    let mut base = vec![0u8; 8 << 20];
    let mut s = 1u64;
    for (i, b) in base.iter_mut().enumerate() {
        if (i / 4096) % 3 != 0 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            *b = (s >> 59) as u8;
        }
    }
    let images: Vec<Vec<u8>> = (0..10u64)
        .map(|k| {
            let mut img = base.clone();
            for p in 0..8u64 {
                let page = ((k * 97 + p * 389) % 2048) as usize;
                img[page * 4096..page * 4096 + 64].fill(k as u8 + 1);
            }
            img
        })
        .collect();
    let refs: Vec<&[u8]> = images.iter().map(|i| &i[..]).collect();
    let rows = block_size_table(&refs, &sizes);
    println!("{}", Table(&rows));
    for pair in rows.windows(2) {
        assert!(
            pair[0].dedup_ratio >= pair[1].dedup_ratio * 0.99,
            "{pair:?}"
        );
        assert!(pair[0].metadata_fraction > pair[1].metadata_fraction);
    }
    assert!(
        rows[0].dedup_ratio > 10.0,
        "zero pages and shared pages dedup: {}",
        rows[0].dedup_ratio
    );
}

/// A backend whose `put_if_absent` checks, pauses, then writes: two writers
/// of one name at the same time both store it, as the trait allows (names are
/// content addresses, so the bytes are identical).
struct CheckThenWrite(MemoryBackend);

impl snapvm::store::Backend for CheckThenWrite {
    fn put_if_absent(
        &self,
        name: &snapvm::store::ObjectName,
        bytes: &[u8],
    ) -> Result<snapvm::store::PutOutcome, snapvm::store::BackendError> {
        if self.0.has(name)? {
            return Ok(snapvm::store::PutOutcome::AlreadyPresent);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        self.0.overwrite(name, bytes);
        Ok(snapvm::store::PutOutcome::Stored)
    }
    fn get(
        &self,
        name: &snapvm::store::ObjectName,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, snapvm::store::BackendError> {
        self.0.get(name, limit)
    }
    fn has(&self, name: &snapvm::store::ObjectName) -> Result<bool, snapvm::store::BackendError> {
        self.0.has(name)
    }
    fn delete(&self, name: &snapvm::store::ObjectName) -> Result<(), snapvm::store::BackendError> {
        self.0.delete(name)
    }
    fn list(
        &self,
        namespace: Namespace,
    ) -> Result<Vec<snapvm::store::ObjectName>, snapvm::store::BackendError> {
        self.0.list(namespace)
    }
}

#[test]
fn one_block_repeated_in_a_put_counts_once() {
    const BS: usize = 4096;
    let block: Vec<u8> = (0..BS).map(|i| (i % 251) as u8 + 1).collect();
    let data = block.repeat(100);
    let dir = tempfile::tempdir().unwrap();
    for what in ["check-then-write", "fs", "memory"] {
        for threads in [1, 2, 4] {
            let backend: Box<dyn snapvm::store::Backend> = match what {
                "check-then-write" => Box::new(CheckThenWrite(MemoryBackend::new())),
                "fs" => Box::new(FsBackend::open(dir.path().join(format!("{threads}"))).unwrap()),
                _ => Box::new(MemoryBackend::new()),
            };
            let store = ConvergentStore::new(
                &config(BS, threads, 0),
                backend,
                ManifestKey::from_bytes([3; 32]),
            )
            .unwrap();
            let put = store.put_bytes(&data, b"").unwrap();
            let manifest_len = store
                .backend()
                .get(&snapvm::store::ObjectName::manifest(&put.manifest), 1 << 20)
                .unwrap()
                .unwrap()
                .len() as u64;
            assert_eq!(put.blocks, 100, "{what}, {threads} threads");
            assert_eq!(put.new_blocks, 1, "{what}, {threads} threads");
            assert_eq!(
                put.new_bytes,
                (BS + 16) as u64 + manifest_len,
                "{what}, {threads} threads"
            );
            assert_eq!(store.get_bytes(&put.manifest).unwrap(), data);
        }
    }
}
