//! `ConnTracker` against nasty input and against a simple model.
//!
//! The nasty frames are the `conn_tracker` fuzz target's corpus: every file
//! in `fuzz/corpus/conn_tracker/` runs through `snapvm::fuzzing::net::run`
//! (which checks the tracker's invariants), and [`seeds`] writes them:
//! `SNAPVM_REGENERATE_CORPUS=1 cargo test --test net_tracker seed_corpus`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use snapvm::fuzzing::net::{self as fuzzing, tcp_frame, Flags};
use snapvm::net::{ConnKey, ConnTracker, Direction, Observation, TrackerConfig};

const G_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const P_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn g(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), port)
}
fn p(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), port)
}

fn from_guest(port: u16, flags: Flags, seq: u32, ack: Option<u32>, data: &[u8]) -> Vec<u8> {
    tcp_frame(G_MAC, P_MAC, g(port), p(80), flags, seq, ack, 4096, data)
}
fn to_guest(port: u16, flags: Flags, seq: u32, ack: Option<u32>, data: &[u8]) -> Vec<u8> {
    tcp_frame(P_MAC, G_MAC, p(80), g(port), flags, seq, ack, 4096, data)
}

fn handshake(port: u16, gi: u32, pi: u32) -> Vec<(Direction, Vec<u8>)> {
    vec![
        (
            Direction::FromGuest,
            from_guest(port, Flags::Syn, gi, None, b""),
        ),
        (
            Direction::ToGuest,
            to_guest(port, Flags::Syn, pi, Some(gi.wrapping_add(1)), b""),
        ),
        (
            Direction::FromGuest,
            from_guest(
                port,
                Flags::None,
                gi.wrapping_add(1),
                Some(pi.wrapping_add(1)),
                b"",
            ),
        ),
    ]
}

/// Named nasty inputs (each an encoded frame list).
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hs = handshake(1000, 5, 9);
    let mut truncated_ip = hs[0].1.clone();
    truncated_ip.truncate(14 + 10);
    let mut bad_ihl = hs[0].1.clone();
    bad_ihl[14] = 0x4f; // header length 60 > packet
    let mut huge_total_len = hs[0].1.clone();
    huge_total_len[16..18].copy_from_slice(&0xffffu16.to_be_bytes());
    let mut fragment = hs[0].1.clone();
    fragment[20] = 0x20; // more fragments
    let mut ipv6 = hs[0].1.clone();
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let mut udp = hs[0].1.clone();
    udp[23] = 17;
    let mut bad_data_offset = hs[0].1.clone();
    bad_data_offset[14 + 20 + 12] = 0xf0; // 60-byte TCP header in 20 bytes
    let mut syn_fin_rst = hs[0].1.clone();
    syn_fin_rst[14 + 20 + 13] = 0x07;
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&G_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    let out_of_window = {
        let mut v = hs.clone();
        v.push((
            Direction::ToGuest,
            to_guest(1000, Flags::Rst, 0x8000_0000, None, b""),
        ));
        v.push((
            Direction::FromGuest,
            from_guest(1000, Flags::None, 0x7000_0000, Some(3), b"far away"),
        ));
        v
    };
    let many = (0..20u16)
        .flat_map(|i| handshake(2000 + i, u32::from(i) * 77, u32::MAX - u32::from(i)))
        .collect::<Vec<_>>();
    let mid_stream = vec![(
        Direction::ToGuest,
        to_guest(3000, Flags::None, 1, Some(1), b"no syn seen"),
    )];
    let one = |f: Vec<u8>| fuzzing::encode(&[(Direction::FromGuest, f)]);
    vec![
        ("empty", vec![]),
        ("short-header", vec![0, 200]),
        ("length-past-end", vec![1, 0xff, 0xff, 1, 2, 3]),
        (
            "random-bytes",
            (0..=255u8).map(|b| b.wrapping_mul(31)).collect(),
        ),
        ("runt-frame", one(vec![0; 13])),
        ("truncated-ip", one(truncated_ip)),
        ("bad-ihl", one(bad_ihl)),
        ("huge-total-len", one(huge_total_len)),
        ("fragment", one(fragment)),
        ("ipv6", one(ipv6)),
        ("udp", one(udp)),
        ("bad-data-offset", one(bad_data_offset)),
        ("syn-fin-rst", one(syn_fin_rst)),
        ("arp", one(arp)),
        ("handshake", fuzzing::encode(&hs)),
        ("out-of-window", fuzzing::encode(&out_of_window)),
        ("table-full", fuzzing::encode(&many)),
        ("mid-stream", fuzzing::encode(&mid_stream)),
    ]
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/conn_tracker")
}

#[test]
fn seed_corpus() {
    let dir = corpus_dir();
    if std::env::var_os("SNAPVM_REGENERATE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (name, bytes) in seeds() {
        let on_disk = std::fs::read(dir.join(name)).unwrap_or_default();
        assert_eq!(on_disk, bytes, "{name}: corpus file out of date");
    }
}

#[test]
fn corpus_never_panics_and_keeps_invariants() {
    let mut files = 0;
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        fuzzing::run(&bytes);
        // Bit flips of each entry too, deterministic.
        for i in 0..bytes.len().min(256) {
            let mut m = bytes.clone();
            m[i] ^= 1 << (i % 8);
            fuzzing::run(&m);
        }
        files += 1;
    }
    assert!(files >= seeds().len());
}

#[test]
fn non_tcp_and_broken_frames_are_not_tracked() {
    let mut t = ConnTracker::new(TrackerConfig::default());
    for (name, bytes) in seeds() {
        let expected_conns = match name {
            "handshake" | "out-of-window" => 1,
            "table-full" => 20,
            _ => 0,
        };
        let n = fuzzing::run(&bytes);
        assert_eq!(n, expected_conns.min(fuzzing::MAX_CONNECTIONS), "{name}");
    }
    // Non-TCP is reported as such, not as malformed.
    let udp = seeds().into_iter().find(|s| s.0 == "udp").unwrap().1;
    assert_eq!(
        t.observe(Direction::FromGuest, &udp[3..]),
        Observation::NotTcp
    );
    let ipv6 = seeds().into_iter().find(|s| s.0 == "ipv6").unwrap().1;
    assert_eq!(
        t.observe(Direction::FromGuest, &ipv6[3..]),
        Observation::NotTcp
    );
    let bad = seeds()
        .into_iter()
        .find(|s| s.0 == "bad-data-offset")
        .unwrap()
        .1;
    assert_eq!(
        t.observe(Direction::FromGuest, &bad[3..]),
        Observation::Malformed
    );
    assert!(t.is_empty());
}

/// One step of the model: who sends how many bytes, and whether the
/// receiver acknowledges everything so far.
#[derive(Clone, Debug)]
struct Step {
    from_guest: bool,
    len: usize,
    acked: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (any::<bool>(), 0usize..300, any::<bool>()).prop_map(|(from_guest, len, acked)| Step {
        from_guest,
        len,
        acked,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The model: each side's next sequence number is its ISN + 1 + the
    /// bytes it sent; the RST each receiver gets first carries exactly that
    /// number, and a second one carries the receiver's last ACK when that
    /// differs.
    #[test]
    fn termination_matches_the_model(
        gi in any::<u32>(),
        pi in any::<u32>(),
        steps in proptest::collection::vec(step(), 0..30),
        garbage in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..5),
    ) {
        let mut t = ConnTracker::new(TrackerConfig::default());
        for (d, f) in handshake(7, gi, pi) {
            t.observe(d, &f);
        }
        let (mut g_next, mut p_next) = (gi.wrapping_add(1), pi.wrapping_add(1));
        let (mut g_ack, mut p_ack) = (p_next, g_next);
        let data = [0x5a; 300];
        for s in &steps {
            if s.from_guest {
                let ack = if s.acked { p_next } else { g_ack };
                t.observe(Direction::FromGuest, &from_guest(7, Flags::None, g_next, Some(ack), &data[..s.len]));
                g_ack = ack;
                g_next = g_next.wrapping_add(s.len as u32);
            } else {
                let ack = if s.acked { g_next } else { p_ack };
                t.observe(Direction::ToGuest, &to_guest(7, Flags::None, p_next, Some(ack), &data[..s.len]));
                p_ack = ack;
                p_next = p_next.wrapping_add(s.len as u32);
            }
        }
        for junk in &garbage {
            t.observe(Direction::ToGuest, junk);
        }
        let key = ConnKey { guest: g(7), peer: p(80) };
        let c = *t.get(&key).unwrap();
        prop_assert_eq!(c.guest.next_seq, g_next);
        prop_assert_eq!(c.peer.next_seq, p_next);
        let term = t.terminate(&key).unwrap();
        let seq = |f: &[u8]| u32::from_be_bytes(f[38..42].try_into().unwrap());
        prop_assert_eq!(seq(&term.to_peer[0]), g_next);
        prop_assert_eq!(seq(&term.to_guest[0]), p_next);
        prop_assert_eq!(term.to_peer.len(), 1 + usize::from(p_ack != g_next));
        prop_assert_eq!(term.to_guest.len(), 1 + usize::from(g_ack != p_next));
        if p_ack != g_next {
            prop_assert_eq!(seq(&term.to_peer[1]), p_ack);
        }
    }

    /// Random byte strings as frame lists never break the tracker.
    #[test]
    fn random_input_keeps_invariants(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        fuzzing::run(&data);
    }
}
