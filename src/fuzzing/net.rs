//! The `conn_tracker` fuzz target's driver, shared with its corpus test
//! (`tests/net_tracker.rs`). Not a stable API.
//!
//! An input is a list of records: a direction byte (even: from the guest,
//! odd: to the guest), a little-endian `u16` length, then that many frame
//! bytes (fewer if the input ends). After every frame, and after a final
//! [`ConnTracker::terminate_all`], the tracker's invariants are checked.

use std::net::SocketAddrV4;

use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};

use crate::net::{ConnTracker, Direction, Observation, TrackerConfig};

/// The table limit used by [`run`]: small, so inputs can reach it.
pub const MAX_CONNECTIONS: usize = 8;

/// Feeds `data` to a tracker and checks its invariants; panics on a
/// broken one. Returns the tracker's termination count.
pub fn run(data: &[u8]) -> usize {
    let mut tracker = ConnTracker::new(TrackerConfig {
        max_connections: MAX_CONNECTIONS,
    });
    let mut rest = data;
    while let [dir, a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
        let (frame, next) = tail.split_at(len);
        rest = next;
        let dir = if dir % 2 == 0 {
            Direction::FromGuest
        } else {
            Direction::ToGuest
        };
        let seen = tracker.observe(dir, frame);
        assert!(tracker.len() <= MAX_CONNECTIONS);
        if let Observation::Tracked(key) = seen {
            assert!(tracker.get(&key).is_some());
        }
    }
    let terms = tracker.terminate_all();
    assert!(tracker.is_empty());
    for t in &terms {
        assert!(t.to_peer.len() <= 2 && t.to_guest.len() <= 2);
        // Every termination frame is a valid RST between the connection's
        // two addresses, with correct checksums.
        for (frames, dir) in [
            (&t.to_peer, Direction::FromGuest),
            (&t.to_guest, Direction::ToGuest),
        ] {
            for f in frames {
                let mut check = ConnTracker::new(TrackerConfig::default());
                let o = check.observe(dir, f);
                assert_eq!(o, Observation::Untracked, "termination frame {f:02x?}");
                let (src, dst) = addrs(f);
                let want = match dir {
                    Direction::FromGuest => (t.key.guest, t.key.peer),
                    Direction::ToGuest => (t.key.peer, t.key.guest),
                };
                assert_eq!((src, dst), want);
            }
        }
    }
    terms.len()
}

fn addrs(f: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let eth = EthernetFrame::new_checked(f).expect("ethernet");
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
    let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
    assert!(tcp.rst());
    (
        SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
        SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
    )
}

/// TCP flags for [`tcp_frame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flags {
    /// Data or a bare ACK.
    None,
    /// SYN (with ACK if `ack` is given).
    Syn,
    /// FIN.
    Fin,
    /// RST.
    Rst,
}

/// A well-formed Ethernet + IPv4 + TCP frame with correct checksums.
#[allow(clippy::too_many_arguments, reason = "a test frame builder")]
pub fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: Flags,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control: match flags {
            Flags::None => TcpControl::None,
            Flags::Syn => TcpControl::Syn,
            Flags::Fin => TcpControl::Fin,
            Flags::Rst => TcpControl::Rst,
        },
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: window,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    crate::net::tracker::tcp_frame(src_mac, dst_mac, src, dst, &tcp)
}

/// Encodes frames as a [`run`] input.
pub fn encode(frames: &[(Direction, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (dir, f) in frames {
        out.push(u8::from(*dir == Direction::ToGuest));
        let len = u16::try_from(f.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&f[..usize::from(len)]);
    }
    out
}
