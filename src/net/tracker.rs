//! [`ConnTracker`]: TCP connection tracking and termination frames.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

/// Which way a frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by the guest, towards the network.
    FromGuest,
    /// Sent by the network, towards the guest.
    ToGuest,
}

/// A TCP connection's addresses, seen from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// The guest's address and port.
    pub guest: SocketAddrV4,
    /// The peer's address and port.
    pub peer: SocketAddrV4,
}

/// Where a tracked connection is in its life, as seen on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnState {
    /// The opening SYN was seen, no answer yet.
    SynSent,
    /// The SYN and the SYN-ACK were seen.
    SynReceived,
    /// The handshake completed.
    Established,
    /// At least one side sent a FIN; the other may still send data.
    Closing,
}

/// One side of a tracked connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    /// Whether this side's SYN was seen (and so `next_seq` is known).
    pub syn_seen: bool,
    /// The sequence number after the last byte (SYN and FIN included) this
    /// side sent: what the other side expects next once all of it arrived.
    pub next_seq: u32,
    /// The last acknowledgement number this side sent, if any: the other
    /// side's sequence number it expects next.
    pub ack: Option<u32>,
    /// The receive window this side last advertised, in bytes (scaled).
    pub window: u32,
    /// The window scale this side announced in its SYN, if any.
    pub window_scale: Option<u8>,
    /// Whether this side sent a FIN.
    pub fin_sent: bool,
}

/// A tracked TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Its addresses.
    pub key: ConnKey,
    /// Its state.
    pub state: ConnState,
    /// Who opened it.
    pub opened_by: Direction,
    /// The guest's side.
    pub guest: Endpoint,
    /// The peer's side.
    pub peer: Endpoint,
    /// The guest's MAC address: the tracker's fixed one
    /// ([`ConnTracker::with_link`]), or as seen on the frames.
    pub guest_mac: [u8; 6],
    /// The MAC address the guest's frames go to (the peer or its router):
    /// the tracker's fixed one ([`ConnTracker::with_link`]), or as seen on
    /// the frames.
    pub peer_mac: [u8; 6],
}

impl Connection {
    /// The frames that would end this connection on both sides (see
    /// [`Termination`]).
    pub fn termination(&self) -> Termination {
        termination_frames(self)
    }
}

/// What [`ConnTracker::observe`] made of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Observation {
    /// Not an IPv4 TCP segment (ARP, IPv6, UDP, a fragment, …): nothing to
    /// track; pass it on untouched.
    NotTcp,
    /// It claims to be IPv4 TCP but does not parse or its checksums are
    /// wrong: its receiver will drop it; the tracker ignores it.
    Malformed,
    /// A segment of a connection the tracker follows (state updated).
    Tracked(ConnKey),
    /// A segment of a connection the tracker does not follow (it saw no
    /// SYN for it): ignored.
    Untracked,
    /// A RST or the last ACK of a FIN exchange ended this connection; it is
    /// no longer tracked.
    Closed(ConnKey),
    /// A SYN for a new connection while the table holds
    /// [`TrackerConfig::max_connections`]: not tracked. A device must not
    /// let it become a connection — drop a guest's, refuse a peer's — so
    /// that no connection escapes termination.
    TableFull,
    /// A SYN for a new connection that the caller of
    /// [`ConnTracker::observe_admitting`] did not admit: not tracked. A
    /// device should drop it.
    NotAdmitted,
}

/// Limits of a [`ConnTracker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// The most connections tracked at once (default 4096). Every entry is
    /// a fixed-size record, so this bounds the tracker's memory.
    pub max_connections: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            max_connections: 4096,
        }
    }
}

/// Counters of a [`ConnTracker`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Frames given to [`ConnTracker::observe`].
    pub frames: u64,
    /// Of those, valid TCP segments.
    pub tcp_segments: u64,
    /// Frames that claimed to be IPv4 TCP and did not parse.
    pub malformed: u64,
    /// New connections refused because the table was full.
    pub table_full: u64,
    /// Connections ended by [`ConnTracker::terminate_all`] or
    /// [`ConnTracker::terminate`].
    pub terminated: u64,
}

/// The frames that end one connection on both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    /// The connection.
    pub key: ConnKey,
    /// Ethernet frames for the peer's side, appearing to come from the
    /// guest, in the order to send them. The first carries the sequence
    /// number the peer expects once everything the guest sent has arrived;
    /// a second one, present only when the peer's last acknowledgement
    /// differs from that, carries the acknowledged number (it resets the
    /// peer if the first arrived ahead of data the peer dropped, and is
    /// ignored otherwise).
    pub to_peer: Vec<Vec<u8>>,
    /// Ethernet frames for the guest, appearing to come from the peer, in
    /// the same manner.
    pub to_guest: Vec<Vec<u8>>,
}

/// Follows TCP connections through the Ethernet frames passing between a
/// guest and the network, and builds the frames that end them.
///
/// Feed it every frame in both directions with [`observe`](Self::observe);
/// frames it cannot make sense of are ignored (they pass untouched — the
/// tracker never changes or drops frames itself). Before a halt, snapshot
/// or migration, [`terminate_all`](Self::terminate_all) gives, for each
/// open connection, a RST for the peer that appears to come from the guest
/// and a RST for the guest that appears to come from the peer, with
/// correct checksums and the sequence number each receiver expects.
#[derive(Clone, Debug)]
pub struct ConnTracker {
    config: TrackerConfig,
    conns: BTreeMap<ConnKey, Connection>,
    stats: TrackerStats,
    /// The guest's and the peer's MAC addresses, when the host knows them
    /// (see [`ConnTracker::with_link`]).
    link: Option<([u8; 6], [u8; 6])>,
    /// The connection the last [`Observation::Closed`] ended (see
    /// [`ConnTracker::reinstate`]).
    last_closed: Option<Connection>,
}

/// A parsed TCP segment, in host terms.
struct Segment {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    window: u16,
    window_scale: Option<u8>,
    /// Sequence space taken: payload + SYN + FIN.
    seg_len: u32,
}

/// `a > b` in sequence-number space.
fn seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl ConnTracker {
    /// An empty tracker.
    pub fn new(config: TrackerConfig) -> Self {
        ConnTracker {
            config,
            conns: BTreeMap::new(),
            stats: TrackerStats::default(),
            link: None,
            last_closed: None,
        }
    }

    /// Fixes the link addresses: every connection, observed or inserted,
    /// records `guest_mac` and `peer_mac` (and its termination frames
    /// carry them), whatever MAC addresses the frames carry. Without it the
    /// tracker takes them from the frames it observes — which a guest
    /// chooses: a device that knows its link should fix them.
    pub fn with_link(mut self, guest_mac: [u8; 6], peer_mac: [u8; 6]) -> Self {
        self.link = Some((guest_mac, peer_mac));
        for c in self.conns.values_mut() {
            (c.guest_mac, c.peer_mac) = (guest_mac, peer_mac);
        }
        self
    }

    /// Its limits.
    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Its counters.
    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// The connections it follows, in key order.
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.conns.values()
    }

    /// How many connections it follows.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether it follows no connection.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// One tracked connection.
    pub fn get(&self, key: &ConnKey) -> Option<&Connection> {
        self.conns.get(key)
    }

    /// Forgets every connection without terminating it.
    pub fn clear(&mut self) {
        self.conns.clear();
    }

    /// Inserts a connection record as it was saved (for example with a
    /// snapshot). Returns `false`, inserting nothing, when the table is
    /// full.
    /// With [fixed link addresses](Self::with_link) the record takes them:
    /// insert only connections captured under this tracker's own identity
    /// (a connection of another guest, relabelled, would be ended from
    /// this one's link as if it were its own).
    pub fn insert(&mut self, mut conn: Connection) -> bool {
        if !self.conns.contains_key(&conn.key) && self.conns.len() >= self.config.max_connections {
            return false;
        }
        if let Some((guest_mac, peer_mac)) = self.link {
            (conn.guest_mac, conn.peer_mac) = (guest_mac, peer_mac);
        }
        self.conns.insert(conn.key, conn);
        true
    }

    /// Looks at one Ethernet frame travelling in `dir` and updates the
    /// connection it belongs to. Any bytes are accepted.
    pub fn observe(&mut self, dir: Direction, frame: &[u8]) -> Observation {
        self.observe_admitting(dir, frame, |_| true)
    }

    /// [`observe`](Self::observe), asking `admit` before a SYN opens a new
    /// connection (not for a retransmitted SYN, nor when the table is
    /// full): when it says no, the tracker follows nothing new and returns
    /// [`Observation::NotAdmitted`]. A device uses it to bound how fast a
    /// guest opens connections.
    pub fn observe_admitting(
        &mut self,
        dir: Direction,
        frame: &[u8],
        admit: impl FnOnce(Direction) -> bool,
    ) -> Observation {
        self.stats.frames += 1;
        let seg = match parse(frame) {
            Parsed::NotTcp => return Observation::NotTcp,
            Parsed::Malformed => {
                self.stats.malformed += 1;
                return Observation::Malformed;
            }
            Parsed::Tcp(seg) => seg,
        };
        self.stats.tcp_segments += 1;
        let (key, mut guest_mac, mut peer_mac) = match dir {
            Direction::FromGuest => (
                ConnKey {
                    guest: seg.src,
                    peer: seg.dst,
                },
                seg.src_mac,
                seg.dst_mac,
            ),
            Direction::ToGuest => (
                ConnKey {
                    guest: seg.dst,
                    peer: seg.src,
                },
                seg.dst_mac,
                seg.src_mac,
            ),
        };

        if let Some(link) = self.link {
            (guest_mac, peer_mac) = link;
        }

        // An opening SYN starts (or restarts) a connection.
        if seg.syn && seg.ack.is_none() && !seg.rst {
            if let Some(c) = self.conns.get(&key) {
                let retransmit = c.opened_by == dir
                    && c.state == ConnState::SynSent
                    && side(c, dir).next_seq == seg.seq.wrapping_add(1);
                if retransmit {
                    return Observation::Tracked(key);
                }
            } else if self.conns.len() >= self.config.max_connections {
                self.stats.table_full += 1;
                return Observation::TableFull;
            }
            if !admit(dir) {
                return Observation::NotAdmitted;
            }
            let me = Endpoint {
                syn_seen: true,
                next_seq: seg.seq.wrapping_add(seg.seg_len),
                ack: None,
                window: u32::from(seg.window),
                window_scale: seg.window_scale,
                fin_sent: seg.fin,
            };
            let conn = Connection {
                key,
                state: ConnState::SynSent,
                opened_by: dir,
                guest: if dir == Direction::FromGuest {
                    me
                } else {
                    Endpoint::default()
                },
                peer: if dir == Direction::ToGuest {
                    me
                } else {
                    Endpoint::default()
                },
                guest_mac,
                peer_mac,
            };
            self.conns.insert(key, conn);
            return Observation::Tracked(key);
        }

        let Some(conn) = self.conns.get_mut(&key) else {
            return Observation::Untracked;
        };

        if seg.rst {
            // A RST ends the connection only if its receiver surely takes
            // it: exactly the sequence number it expects (RFC 5961; a RST
            // merely in the window earns a challenge ACK from Linux), or,
            // before the receiver's first ACK, one that acknowledges its
            // SYN. Otherwise the connection stays tracked: terminating a
            // connection that is already gone costs one ignored RST,
            // forgetting a live one would leave it half-open.
            let sender = *side(conn, dir);
            let receiver = *side(conn, other(dir));
            let accepted = match receiver.ack {
                Some(rcv_nxt) => {
                    seg.seq == rcv_nxt || (sender.syn_seen && seg.seq == sender.next_seq)
                }
                None => seg.ack == Some(receiver.next_seq) || !receiver.syn_seen,
            };
            if accepted {
                self.last_closed = self.conns.remove(&key);
                return Observation::Closed(key);
            }
            return Observation::Tracked(key);
        }

        conn.guest_mac = guest_mac;
        conn.peer_mac = peer_mac;
        let both_scale = conn.guest.window_scale.is_some() && conn.peer.window_scale.is_some();
        let state = conn.state;
        let me = side_mut(conn, dir);
        if seg.syn {
            // A SYN-ACK: the answering side's first segment.
            if !me.syn_seen {
                me.syn_seen = true;
                me.next_seq = seg.seq;
                me.window_scale = seg.window_scale;
            }
        } else if !me.syn_seen {
            // The tracker missed this side's SYN: nothing to learn safely.
            return Observation::Tracked(key);
        }
        let end = seg.seq.wrapping_add(seg.seg_len);
        if seq_gt(end, me.next_seq) {
            me.next_seq = end;
        }
        if let Some(ack) = seg.ack {
            if me.ack.is_none_or(|prev| seq_gt(ack, prev)) {
                me.ack = Some(ack);
            }
        }
        let scale = if both_scale && !seg.syn {
            me.window_scale.unwrap_or(0)
        } else {
            0
        };
        me.window = u32::from(seg.window) << scale;
        if seg.fin {
            me.fin_sent = true;
        }

        conn.state = match state {
            ConnState::SynSent if seg.syn => ConnState::SynReceived,
            ConnState::SynReceived if !seg.syn && dir == conn.opened_by && seg.ack.is_some() => {
                ConnState::Established
            }
            s => s,
        };
        if conn.guest.fin_sent || conn.peer.fin_sent {
            conn.state = ConnState::Closing;
        }
        // Both FINs sent and both acknowledged: the connection is over.
        let acked = |by: &Endpoint, of: &Endpoint| by.ack == Some(of.next_seq);
        if conn.guest.fin_sent
            && conn.peer.fin_sent
            && acked(&conn.guest, &conn.peer)
            && acked(&conn.peer, &conn.guest)
        {
            self.last_closed = self.conns.remove(&key);
            return Observation::Closed(key);
        }
        Observation::Tracked(key)
    }

    /// Follows `key` again as it was before the frame that ended it, when
    /// the last [`observe`](Self::observe) reported
    /// [`Observation::Closed(key)`](Observation::Closed) and that frame
    /// never reached its receiver (a device could not send it): a
    /// connection is forgotten only when its end was delivered. Returns
    /// whether it did.
    pub fn reinstate(&mut self, key: &ConnKey) -> bool {
        match self.last_closed.take() {
            Some(conn) if conn.key == *key => self.insert(conn),
            other => {
                self.last_closed = other;
                false
            }
        }
    }

    /// The frames that would end one connection, without forgetting it.
    pub fn termination(&self, key: &ConnKey) -> Option<Termination> {
        self.conns.get(key).map(termination_frames)
    }

    /// Ends one connection: returns its frames and forgets it.
    pub fn terminate(&mut self, key: &ConnKey) -> Option<Termination> {
        let conn = self.conns.remove(key)?;
        self.stats.terminated += 1;
        Some(termination_frames(&conn))
    }

    /// Ends every tracked connection: returns their frames (in key order)
    /// and forgets them.
    pub fn terminate_all(&mut self) -> Vec<Termination> {
        let conns = std::mem::take(&mut self.conns);
        self.stats.terminated += conns.len() as u64;
        conns.values().map(termination_frames).collect()
    }
}

fn other(dir: Direction) -> Direction {
    match dir {
        Direction::FromGuest => Direction::ToGuest,
        Direction::ToGuest => Direction::FromGuest,
    }
}

/// The endpoint that sends frames travelling in `dir`.
fn side(conn: &Connection, dir: Direction) -> &Endpoint {
    match dir {
        Direction::FromGuest => &conn.guest,
        Direction::ToGuest => &conn.peer,
    }
}

fn side_mut(conn: &mut Connection, dir: Direction) -> &mut Endpoint {
    match dir {
        Direction::FromGuest => &mut conn.guest,
        Direction::ToGuest => &mut conn.peer,
    }
}

enum Parsed {
    NotTcp,
    Malformed,
    Tcp(Segment),
}

fn parse(frame: &[u8]) -> Parsed {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Parsed::NotTcp;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return Parsed::NotTcp;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return Parsed::Malformed;
    };
    if ip.version() != 4 {
        return Parsed::Malformed;
    }
    if ip.next_header() != IpProtocol::Tcp {
        return Parsed::NotTcp;
    }
    // Fragments: the tracker does not reassemble (the guest's stack sends
    // none, and its receiver would reassemble before TCP sees them).
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Parsed::NotTcp;
    }
    let caps = ChecksumCapabilities::default();
    let Ok(ip_repr) = Ipv4Repr::parse(&ip, &caps) else {
        return Parsed::Malformed;
    };
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return Parsed::Malformed;
    };
    let src_ip = IpAddress::Ipv4(ip_repr.src_addr);
    let dst_ip = IpAddress::Ipv4(ip_repr.dst_addr);
    let Ok(repr) = TcpRepr::parse(&tcp, &src_ip, &dst_ip, &caps) else {
        return Parsed::Malformed;
    };
    let payload_len = u32::try_from(repr.payload.len()).unwrap_or(u32::MAX);
    let control_len = match repr.control {
        TcpControl::Syn | TcpControl::Fin => 1,
        _ => 0,
    };
    Parsed::Tcp(Segment {
        src_mac: eth.src_addr().0,
        dst_mac: eth.dst_addr().0,
        src: SocketAddrV4::new(ip_repr.src_addr, repr.src_port),
        dst: SocketAddrV4::new(ip_repr.dst_addr, repr.dst_port),
        seq: repr.seq_number.0 as u32,
        ack: repr.ack_number.map(|a| a.0 as u32),
        syn: repr.control == TcpControl::Syn,
        fin: repr.control == TcpControl::Fin,
        rst: repr.control == TcpControl::Rst,
        window: repr.window_len,
        window_scale: repr.window_scale,
        seg_len: payload_len.saturating_add(control_len),
    })
}

fn termination_frames(c: &Connection) -> Termination {
    let guest = c.key.guest;
    let peer = c.key.peer;
    let mut to_peer = Vec::with_capacity(2);
    let mut to_guest = Vec::with_capacity(2);
    // To the peer, from the guest. The peer expects the guest's next
    // sequence number (data the guest sent is ahead of this RST on the
    // wire); if the guest's SYN is all we know, that is its ISN + 1 too.
    if c.guest.syn_seen {
        let ack = c.peer.syn_seen.then_some(c.peer.next_seq);
        to_peer.push(rst_frame(
            c.guest_mac,
            c.peer_mac,
            guest,
            peer,
            c.guest.next_seq,
            ack,
        ));
        if let Some(acked) = c.peer.ack {
            if acked != c.guest.next_seq {
                to_peer.push(rst_frame(c.guest_mac, c.peer_mac, guest, peer, acked, ack));
            }
        }
    }
    // To the guest, from the peer, with the same rule. A guest that sent a
    // SYN and heard nothing back accepts a RST|ACK acknowledging its SYN.
    let guest_ack = c.guest.syn_seen.then_some(c.guest.next_seq);
    if c.peer.syn_seen {
        to_guest.push(rst_frame(
            c.peer_mac,
            c.guest_mac,
            peer,
            guest,
            c.peer.next_seq,
            guest_ack,
        ));
        if let Some(acked) = c.guest.ack {
            if acked != c.peer.next_seq {
                to_guest.push(rst_frame(
                    c.peer_mac,
                    c.guest_mac,
                    peer,
                    guest,
                    acked,
                    guest_ack,
                ));
            }
        }
    } else if guest_ack.is_some() {
        to_guest.push(rst_frame(
            c.peer_mac,
            c.guest_mac,
            peer,
            guest,
            0,
            guest_ack,
        ));
    }
    Termination {
        key: c.key,
        to_peer,
        to_guest,
    }
}

/// The answer to a peer's SYN that is not to become a connection (the
/// tracker's table is full): a RST|ACK acknowledging the SYN, from the
/// address it was sent to, as a closed port answers, from `guest_mac` to
/// `peer_mac`. `None` when `syn` is not a valid opening SYN.
pub(crate) fn refusal(syn: &[u8], guest_mac: [u8; 6], peer_mac: [u8; 6]) -> Option<Vec<u8>> {
    let Parsed::Tcp(s) = parse(syn) else {
        return None;
    };
    if !s.syn || s.ack.is_some() || s.rst {
        return None;
    }
    Some(rst_frame(
        guest_mac,
        peer_mac,
        s.dst,
        s.src,
        0,
        Some(s.seq.wrapping_add(s.seg_len)),
    ))
}

/// Length of the frames [`rst_frame`] builds: Ethernet + IPv4 + TCP headers.
pub(crate) const RST_FRAME_LEN: usize = 14 + 20 + 20;

/// A RST (with ACK when `ack` is given) from `src` to `dst`, as a complete
/// Ethernet frame with correct IPv4 and TCP checksums.
fn rst_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let buf = tcp_frame(src_mac, dst_mac, src, dst, &tcp);
    debug_assert_eq!(buf.len(), RST_FRAME_LEN);
    buf
}

/// `tcp` from `src` to `dst` as a complete Ethernet frame (IPv4, TTL 64)
/// with correct IPv4 and TCP checksums.
pub(crate) fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    tcp: &TcpRepr<'_>,
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut ip_packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut ip_packet, &caps);
    let mut tcp_packet = TcpPacket::new_unchecked(ip_packet.payload_mut());
    tcp.emit(
        &mut tcp_packet,
        &IpAddress::Ipv4(*src.ip()),
        &IpAddress::Ipv4(*dst.ip()),
        &caps,
    );
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const G_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const P_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn g() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 40000)
    }
    fn p() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80)
    }

    struct Seg {
        control: TcpControl,
        seq: u32,
        ack: Option<u32>,
        window: u16,
        scale: Option<u8>,
        payload: &'static [u8],
    }

    fn frame(dir: Direction, s: Seg) -> Vec<u8> {
        let (src_mac, dst_mac, src, dst) = match dir {
            Direction::FromGuest => (G_MAC, P_MAC, g(), p()),
            Direction::ToGuest => (P_MAC, G_MAC, p(), g()),
        };
        let tcp = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control: s.control,
            seq_number: TcpSeqNumber(s.seq as i32),
            ack_number: s.ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: s.window,
            window_scale: s.scale,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: s.payload,
        };
        tcp_frame(src_mac, dst_mac, src, dst, &tcp)
    }

    fn seg(control: TcpControl, seq: u32, ack: Option<u32>, payload: &'static [u8]) -> Seg {
        Seg {
            control,
            seq,
            ack,
            window: 1000,
            scale: None,
            payload,
        }
    }

    /// Handshake guest → peer with ISNs near the wrap point.
    fn established() -> ConnTracker {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let gi = u32::MAX - 1;
        let pi = 7000;
        let s = |o| assert!(matches!(o, Observation::Tracked(_)), "{o:?}");
        s(t.observe(
            Direction::FromGuest,
            &frame(Direction::FromGuest, seg(TcpControl::Syn, gi, None, b"")),
        ));
        s(t.observe(
            Direction::ToGuest,
            &frame(
                Direction::ToGuest,
                seg(TcpControl::Syn, pi, Some(gi.wrapping_add(1)), b""),
            ),
        ));
        s(t.observe(
            Direction::FromGuest,
            &frame(
                Direction::FromGuest,
                seg(TcpControl::None, gi.wrapping_add(1), Some(pi + 1), b""),
            ),
        ));
        t
    }

    /// Reads a RST frame back: (src, dst, seq, ack).
    fn read_rst(f: &[u8]) -> (SocketAddrV4, SocketAddrV4, u32, Option<u32>) {
        let Parsed::Tcp(s) = parse(f) else {
            panic!("not a valid TCP frame (checksums?)")
        };
        assert!(s.rst);
        (s.src, s.dst, s.seq, s.ack)
    }

    #[test]
    fn handshake_data_and_termination_sequence_numbers() {
        let mut t = established();
        let key = ConnKey {
            guest: g(),
            peer: p(),
        };
        assert_eq!(t.get(&key).unwrap().state, ConnState::Established);
        // Guest sends 5 bytes (across the wrap), peer sends 3 and acks all.
        let gi1 = (u32::MAX - 1).wrapping_add(1);
        t.observe(
            Direction::FromGuest,
            &frame(
                Direction::FromGuest,
                seg(TcpControl::Psh, gi1, Some(7001), b"hello"),
            ),
        );
        t.observe(
            Direction::ToGuest,
            &frame(
                Direction::ToGuest,
                seg(TcpControl::Psh, 7001, Some(gi1.wrapping_add(5)), b"abc"),
            ),
        );
        let c = *t.get(&key).unwrap();
        assert_eq!(c.guest.next_seq, gi1.wrapping_add(5));
        assert_eq!(c.peer.next_seq, 7004);
        assert_eq!(c.peer.ack, Some(gi1.wrapping_add(5)));
        assert_eq!(c.guest.ack, Some(7001));

        let term = t.terminate(&key).unwrap();
        assert!(t.is_empty());
        // To the peer: exactly the guest's next sequence number; the peer
        // acknowledged everything, so one frame.
        assert_eq!(term.to_peer.len(), 1);
        assert_eq!(
            read_rst(&term.to_peer[0]),
            (g(), p(), gi1.wrapping_add(5), Some(7004))
        );
        assert_eq!(&term.to_peer[0][0..6], &P_MAC);
        assert_eq!(&term.to_peer[0][6..12], &G_MAC);
        // To the guest: the peer's next sequence number first, then the
        // guest's last ack (it had not acked "abc" yet).
        assert_eq!(term.to_guest.len(), 2);
        assert_eq!(
            read_rst(&term.to_guest[0]),
            (p(), g(), 7004, Some(gi1.wrapping_add(5)))
        );
        assert_eq!(read_rst(&term.to_guest[1]).2, 7001);
        assert_eq!(&term.to_guest[0][0..6], &G_MAC);
    }

    #[test]
    fn syn_only_connection_gets_rst_ack_of_the_syn() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        t.observe(
            Direction::FromGuest,
            &frame(Direction::FromGuest, seg(TcpControl::Syn, 100, None, b"")),
        );
        let term = t.terminate_all();
        assert_eq!(term.len(), 1);
        assert_eq!(read_rst(&term[0].to_guest[0]).3, Some(101));
        assert_eq!(read_rst(&term[0].to_peer[0]).2, 101);
    }

    #[test]
    fn rst_and_fin_exchange_end_tracking() {
        let mut t = established();
        let gi1 = u32::MAX;
        // Out-of-window RST from the peer: ignored, still tracked.
        let o = t.observe(
            Direction::ToGuest,
            &frame(
                Direction::ToGuest,
                seg(TcpControl::Rst, 7001 + 100_000, None, b""),
            ),
        );
        assert!(matches!(o, Observation::Tracked(_)));
        assert_eq!(t.len(), 1);
        // In the window but not exact: Linux answers with a challenge ACK,
        // so the connection stays tracked.
        let o = t.observe(
            Direction::ToGuest,
            &frame(
                Direction::ToGuest,
                seg(TcpControl::Rst, 7001 + 10, None, b""),
            ),
        );
        assert!(matches!(o, Observation::Tracked(_)));
        assert_eq!(t.len(), 1);
        // FIN both ways and the last ACK.
        t.observe(
            Direction::FromGuest,
            &frame(
                Direction::FromGuest,
                seg(TcpControl::Fin, gi1, Some(7001), b""),
            ),
        );
        assert_eq!(t.connections().next().unwrap().state, ConnState::Closing);
        t.observe(
            Direction::ToGuest,
            &frame(
                Direction::ToGuest,
                seg(TcpControl::Fin, 7001, Some(gi1.wrapping_add(1)), b""),
            ),
        );
        let o = t.observe(
            Direction::FromGuest,
            &frame(
                Direction::FromGuest,
                seg(TcpControl::None, gi1.wrapping_add(1), Some(7002), b""),
            ),
        );
        assert!(matches!(o, Observation::Closed(_)), "{o:?}");
        assert!(t.is_empty());

        // An in-window RST ends a connection at once.
        let mut t = established();
        let before = *t.connections().next().unwrap();
        let o = t.observe(
            Direction::ToGuest,
            &frame(Direction::ToGuest, seg(TcpControl::Rst, 7001, None, b"")),
        );
        assert!(matches!(o, Observation::Closed(_)));
        assert!(t.is_empty());
        // Undelivered, it is undone: the record is back as it was.
        assert!(t.reinstate(&before.key));
        assert_eq!(t.get(&before.key), Some(&before));
        assert!(!t.reinstate(&before.key), "only once");
    }

    #[test]
    fn table_limit_refuses_new_connections() {
        let mut t = ConnTracker::new(TrackerConfig { max_connections: 1 });
        t.observe(
            Direction::FromGuest,
            &frame(Direction::FromGuest, seg(TcpControl::Syn, 1, None, b"")),
        );
        let mut other = frame(Direction::ToGuest, seg(TcpControl::Syn, 1, None, b""));
        // Same frame from another peer port: a new connection.
        let mut p = TcpPacket::new_unchecked(&mut other[34..]);
        p.set_src_port(81);
        p.fill_checksum(
            &IpAddress::Ipv4(*self::p().ip()),
            &IpAddress::Ipv4(*g().ip()),
        );
        assert_eq!(
            t.observe(Direction::ToGuest, &other),
            Observation::TableFull
        );
        assert_eq!(t.stats().table_full, 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_refusal_answers_a_peer_syn_like_a_closed_port() {
        let syn = frame(Direction::ToGuest, seg(TcpControl::Syn, 500, None, b""));
        let rst = refusal(&syn, G_MAC, P_MAC).expect("a refusal");
        assert_eq!(read_rst(&rst), (g(), p(), 0, Some(501)));
        assert_eq!(&rst[0..6], &P_MAC);
        assert_eq!(&rst[6..12], &G_MAC);
        // Only an opening SYN gets one.
        let ack = frame(Direction::ToGuest, seg(TcpControl::None, 500, Some(1), b""));
        assert_eq!(refusal(&ack, G_MAC, P_MAC), None);
        assert_eq!(refusal(&[0u8; 60], G_MAC, P_MAC), None);
    }

    #[test]
    fn admission_is_asked_for_new_connections_only() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let syn = frame(Direction::FromGuest, seg(TcpControl::Syn, 1, None, b""));
        assert_eq!(
            t.observe_admitting(Direction::FromGuest, &syn, |_| false),
            Observation::NotAdmitted
        );
        assert!(t.is_empty());
        let mut asked = 0;
        let mut admit = |_| {
            asked += 1;
            true
        };
        assert!(matches!(
            t.observe_admitting(Direction::FromGuest, &syn, &mut admit),
            Observation::Tracked(_)
        ));
        // A retransmission of the SYN is not a new connection.
        assert!(matches!(
            t.observe_admitting(Direction::FromGuest, &syn, &mut admit),
            Observation::Tracked(_)
        ));
        assert_eq!(asked, 1);
    }

    #[test]
    fn fixed_link_addresses_are_not_learned_from_frames() {
        let other = [2, 0, 0, 0, 0, 0x99];
        let mut t = established().with_link(G_MAC, other);
        let key = ConnKey {
            guest: g(),
            peer: p(),
        };
        assert_eq!(t.get(&key).unwrap().peer_mac, other);
        // The guest's frames go to P_MAC: the record keeps the fixed one.
        t.observe(
            Direction::FromGuest,
            &frame(
                Direction::FromGuest,
                seg(TcpControl::None, u32::MAX, Some(7001), b"x"),
            ),
        );
        let c = *t.get(&key).unwrap();
        assert_eq!((c.guest_mac, c.peer_mac), (G_MAC, other));
        let mut inserted = c;
        inserted.peer_mac = P_MAC;
        t.clear();
        assert!(t.insert(inserted));
        let term = t.terminate(&key).unwrap();
        assert_eq!(&term.to_peer[0][0..6], &other);
        assert_eq!(&term.to_peer[0][6..12], &G_MAC);
    }

    #[test]
    fn bad_checksum_is_malformed_and_ignored() {
        let mut t = established();
        let mut f = frame(Direction::ToGuest, seg(TcpControl::Rst, 7001, None, b""));
        let n = f.len();
        f[n - 1] ^= 0xff; // inside the TCP header: breaks the checksum
        assert_eq!(t.observe(Direction::ToGuest, &f), Observation::Malformed);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn window_scale_applies_after_the_handshake() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let mk = |control, seq, ack, window, scale| Seg {
            control,
            seq,
            ack,
            window,
            scale,
            payload: b"",
        };
        t.observe(
            Direction::FromGuest,
            &frame(
                Direction::FromGuest,
                mk(TcpControl::Syn, 1, None, 100, Some(3)),
            ),
        );
        t.observe(
            Direction::ToGuest,
            &frame(
                Direction::ToGuest,
                mk(TcpControl::Syn, 9, Some(2), 100, Some(7)),
            ),
        );
        t.observe(
            Direction::FromGuest,
            &frame(
                Direction::FromGuest,
                mk(TcpControl::None, 2, Some(10), 100, None),
            ),
        );
        let c = t.connections().next().unwrap();
        assert_eq!(c.guest.window, 800);
        assert_eq!(c.peer.window, 100);
    }
}
