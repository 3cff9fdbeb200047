//! Nasty manifests: the parser's corpus, run as ordinary tests. The same
//! shapes seed the fuzz target in `fuzz/` (`manifest_open`).

use snapvm::store::manifest::{Malformed, SealedHeader, HEADER_LEN, MANIFEST_MAGIC};
use snapvm::store::{BlockId, BlockKey, Entry, Manifest, ManifestError, ManifestKey};

fn header(ref_count: u32, body_len: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&MANIFEST_MAGIC);
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&[0; 8]); // key id
    b.extend_from_slice(&[0; 12]); // nonce
    b.extend_from_slice(&ref_count.to_le_bytes());
    b.extend_from_slice(&body_len.to_le_bytes());
    assert_eq!(b.len(), HEADER_LEN);
    b
}

/// Every sealed-layer case: (bytes, what `SealedHeader::parse` must say).
fn sealed_cases() -> Vec<(&'static str, Vec<u8>)> {
    let mut flags = header(0, 16);
    flags[10] = 1;
    let mut unsorted = header(2, 16);
    unsorted.extend_from_slice(&[2; 32]);
    unsorted.extend_from_slice(&[1; 32]);
    unsorted.extend_from_slice(&[0; 16]);
    let mut dup = header(2, 16);
    dup.extend_from_slice(&[1; 32]);
    dup.extend_from_slice(&[1; 32]);
    dup.extend_from_slice(&[0; 16]);
    vec![
        ("empty", vec![]),
        ("magic only", MANIFEST_MAGIC.to_vec()),
        ("bad magic", b"SNAPVMXX".repeat(8)),
        ("header only", header(0, 16)),
        ("u32::MAX refs", header(u32::MAX, 16)),
        ("u64::MAX body", header(0, u64::MAX)),
        ("both max", header(u32::MAX, u64::MAX)),
        (
            "body shorter than a tag",
            [header(0, 3), vec![0; 3]].concat(),
        ),
        ("trailing bytes", [header(0, 16), vec![0; 17]].concat()),
        ("unknown flags", flags),
        ("unsorted refs", unsorted),
        ("duplicate refs", dup),
        ("all ones", vec![0xff; 200]),
    ]
}

#[test]
fn sealed_layer_rejects_nasty_inputs_without_panicking() {
    let key = ManifestKey::from_bytes([1; 32]);
    for (what, bytes) in sealed_cases() {
        let parsed = SealedHeader::parse(&bytes);
        let opened = Manifest::open(&bytes, &key);
        assert!(opened.is_err(), "{what}");
        let expected_kind = match what {
            "empty" | "magic only" | "header only" | "u32::MAX refs" | "u64::MAX body"
            | "both max" => {
                matches!(parsed, Err(ManifestError::Truncated { .. }))
            }
            "bad magic" | "all ones" => parsed == Err(ManifestError::BadMagic),
            "body shorter than a tag" => parsed == Err(ManifestError::Tampered),
            "trailing bytes" => parsed == Err(ManifestError::TrailingBytes { extra: 1 }),
            "unknown flags" => parsed == Err(ManifestError::UnknownFlags { flags: 1 }),
            "unsorted refs" | "duplicate refs" => parsed == Err(Malformed::RefsNotSorted.into()),
            _ => unreachable!(),
        };
        assert!(expected_kind, "{what}: {parsed:?}");
    }
}

fn body(block_size: u32, total: u64, meta_len: u32, count: u64, entries: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&block_size.to_le_bytes());
    b.extend_from_slice(&total.to_le_bytes());
    b.extend_from_slice(&meta_len.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(entries);
    b
}

#[test]
fn body_layer_rejects_nasty_inputs_without_panicking() {
    let refs = [BlockId::from_bytes([1; 32])];
    let data_entry = |len: u32, r: u32| {
        let mut e = vec![1u8];
        e.extend_from_slice(&len.to_le_bytes());
        e.extend_from_slice(&r.to_le_bytes());
        e.extend_from_slice(&[0; 32]);
        e
    };
    let cases: Vec<(&str, Vec<u8>, Malformed)> = vec![
        ("empty", vec![], Malformed::BodyTruncated),
        (
            "block size 0",
            body(0, 0, 0, 0, &[]),
            Malformed::BlockSize(0),
        ),
        (
            "block size too big",
            body(u32::MAX, 0, 0, 0, &[]),
            Malformed::BlockSize(u32::MAX),
        ),
        (
            "metadata length u32::MAX",
            body(4, 0, u32::MAX, 0, &[]),
            Malformed::BodyTruncated,
        ),
        (
            "u64::MAX total, no entries",
            body(1, u64::MAX, 0, u64::MAX, &[]),
            Malformed::BodyTruncated,
        ),
        (
            "count disagrees",
            body(4, 8, 0, 3, &[]),
            Malformed::EntryCount {
                count: 3,
                total_len: 8,
            },
        ),
        (
            "kind 7",
            body(4, 4, 0, 1, &[7, 4, 0, 0, 0]),
            Malformed::EntryKind { index: 0, kind: 7 },
        ),
        (
            "short last",
            body(4, 5, 0, 2, &[0, 3, 0, 0, 0, 0, 2, 0, 0, 0]),
            Malformed::EntryLength { index: 0, len: 3 },
        ),
        (
            "zero length",
            body(4, 4, 0, 1, &[0, 0, 0, 0, 0]),
            Malformed::EntryLength { index: 0, len: 0 },
        ),
        (
            "ref out of range",
            body(4, 4, 0, 1, &data_entry(4, 1)),
            Malformed::RefIndex {
                index: 0,
                reference: 1,
            },
        ),
        (
            "ref u32::MAX",
            body(4, 4, 0, 1, &data_entry(4, u32::MAX)),
            Malformed::RefIndex {
                index: 0,
                reference: u32::MAX,
            },
        ),
        (
            "unused ref",
            body(4, 4, 0, 1, &[0, 4, 0, 0, 0]),
            Malformed::UnusedRef,
        ),
        (
            "trailing",
            body(4, 4, 0, 1, &[data_entry(4, 0), vec![0]].concat()),
            Malformed::TrailingBytes,
        ),
        (
            "cut entry",
            body(4, 4, 0, 1, &data_entry(4, 0)[..20]),
            Malformed::BodyTruncated,
        ),
    ];
    for (what, bytes, expected) in cases {
        assert_eq!(
            Manifest::decode_body(&bytes, &refs),
            Err(expected.into()),
            "{what}"
        );
    }
    // And the valid one, for contrast.
    let ok = body(4, 4, 0, 1, &data_entry(4, 0));
    assert_eq!(
        Manifest::decode_body(&ok, &refs).unwrap().entries,
        vec![Entry::Data {
            id: refs[0],
            key: BlockKey::from_bytes([0; 32]),
            len: 4
        }]
    );
}

#[test]
fn every_prefix_and_bit_flip_of_a_real_manifest_is_rejected() {
    let key = ManifestKey::from_bytes([3; 32]);
    let m = Manifest {
        block_size: 4096,
        total_len: 3 * 4096 + 5,
        metadata: b"snapshot of runtime X".to_vec(),
        entries: vec![
            Entry::Data {
                id: BlockId::from_bytes([5; 32]),
                key: BlockKey::from_bytes([6; 32]),
                len: 4096,
            },
            Entry::Zero { len: 4096 },
            Entry::Data {
                id: BlockId::from_bytes([4; 32]),
                key: BlockKey::from_bytes([7; 32]),
                len: 4096,
            },
            Entry::Data {
                id: BlockId::from_bytes([5; 32]),
                key: BlockKey::from_bytes([6; 32]),
                len: 5,
            },
        ],
    };
    let sealed = m.seal(&key).unwrap();
    assert_eq!(Manifest::open(&sealed, &key).unwrap(), m);
    for cut in 0..sealed.len() {
        assert!(
            matches!(
                Manifest::open(&sealed[..cut], &key),
                Err(ManifestError::Truncated { .. })
            ),
            "prefix {cut}"
        );
    }
    for pos in 0..sealed.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = sealed.clone();
            t[pos] ^= bit;
            assert!(Manifest::open(&t, &key).is_err(), "flip at {pos}");
        }
    }
}

/// The fuzz target's body, run over the committed seed corpus
/// (`fuzz/corpus/manifest_open`), so the seeds stay meaningful as the format
/// evolves.
#[test]
fn fuzz_corpus_runs_as_a_test() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/manifest_open");
    let key = ManifestKey::from_bytes([7; 32]);
    let mut opened = 0;
    let mut bodies = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let _ = SealedHeader::parse(&data);
        if Manifest::open(&data, &key).is_ok() {
            opened += 1;
        }
        if let Some((&n, body)) = data.split_first() {
            let refs: Vec<BlockId> = (0..n % 5).map(|i| BlockId::from_bytes([i; 32])).collect();
            if let Ok(m) = Manifest::decode_body(body, &refs) {
                assert_eq!(
                    m.encode_body(&refs).as_deref(),
                    Some(body),
                    "{}",
                    path.display()
                );
                bodies += 1;
            }
        }
    }
    assert!(opened >= 2, "the sealed seeds open under the fuzz key");
    assert!(bodies >= 3, "the body seeds decode");
}
