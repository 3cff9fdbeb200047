//! The VM's network device: frames between the guest's buffers and a TAP
//! device, watched by a [`ConnTracker`] and filtered against spoofing.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::wire::{
    ArpOperation, ArpPacket, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet,
};

use super::coalesce::{Run, Segment};
use super::tap::{Readiness, Tap, VnetHdr};
use super::tracker::{
    self, ConnKey, ConnTracker, Connection, Direction, Observation, TrackerConfig,
};
use crate::abi;

/// The network identity of one VM: what its frames must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetIdentity {
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// The guest's IPv4 address.
    pub ip: Ipv4Addr,
    /// The prefix length of its network (0..=32).
    pub prefix_len: u8,
    /// Its default gateway (the peer side of the TAP device).
    pub gateway: Ipv4Addr,
}

/// Most ARP frames a guest may send per second by default (see
/// [`NetConfig::arp_per_second`]).
pub const DEFAULT_ARP_PER_SECOND: u32 = 50;
/// Most new TCP connections a guest may open per second by default (see
/// [`NetConfig::syn_per_second`]).
pub const DEFAULT_SYN_PER_SECOND: u32 = 1000;
/// Most frames the host queues for a guest (resets it must take in) by
/// default.
pub const DEFAULT_MAX_QUEUED: usize = 8192;

/// A network device for a VM, backed by a TAP device on the host (see
/// [`VmConfig::network`](crate::VmConfig::network)).
///
/// ```
/// use std::net::Ipv4Addr;
/// use snapvm::net::{NetConfig, NetIdentity};
///
/// let identity = NetIdentity {
///     mac: [0x02, 0, 0, 0, 0, 0x10],
///     ip: Ipv4Addr::new(10, 0, 0, 2),
///     prefix_len: 24,
///     gateway: Ipv4Addr::new(10, 0, 0, 1),
/// };
/// let net = NetConfig::new("tap0", identity);
/// assert_eq!(net.identity().ip, Ipv4Addr::new(10, 0, 0, 2));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub(crate) tap: String,
    pub(crate) identity: NetIdentity,
    pub(crate) tracker: TrackerConfig,
    pub(crate) arp_per_second: u32,
    pub(crate) syn_per_second: u32,
    pub(crate) max_queued: usize,
    pub(crate) peer_mac: Option<[u8; 6]>,
}

impl NetConfig {
    /// A device on TAP device `tap` with `identity`. Each VM opens the TAP
    /// device when it is built or restored; a TAP device serves one VM at
    /// a time.
    pub fn new(tap: impl Into<String>, identity: NetIdentity) -> Self {
        Self {
            tap: tap.into(),
            identity,
            tracker: TrackerConfig::default(),
            arp_per_second: DEFAULT_ARP_PER_SECOND,
            syn_per_second: DEFAULT_SYN_PER_SECOND,
            max_queued: DEFAULT_MAX_QUEUED,
            peer_mac: None,
        }
    }

    /// The TAP device's name.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// The identity.
    pub fn identity(&self) -> NetIdentity {
        self.identity
    }

    /// Limits of the connection tracker (its table size also bounds how
    /// many TCP connections the guest may have open: a SYN beyond it is
    /// dropped and counted).
    pub fn tracker(mut self, config: TrackerConfig) -> Self {
        self.tracker = config;
        self
    }

    /// Most ARP frames the guest may send per second (bursts up to the
    /// same number); the rest are dropped and counted.
    pub fn arp_per_second(mut self, n: u32) -> Self {
        self.arp_per_second = n;
        self
    }

    /// Most new TCP connections the guest may open per second, with
    /// bursts up to the same number (default
    /// [`DEFAULT_SYN_PER_SECOND`], 1000): a SYN for a new connection over
    /// the rate is dropped before it reaches the peer and counted in
    /// [`NetStats::dropped_syn_rate`]. A retransmitted SYN is not a new
    /// connection; connections the peer opens are not limited.
    pub fn syn_per_second(mut self, n: u32) -> Self {
        self.syn_per_second = n;
        self
    }

    /// The MAC address of the guest's link peer: the host's side of the
    /// TAP device, or the router the guest's frames go to when the TAP
    /// device is bridged. By default the TAP device's own MAC address, read
    /// when the VM opens it (right when the host routes for the TAP
    /// device, the usual setup). The guest's frames must go to it (or, but
    /// for TCP, to broadcast), and the host's resets go to it: what the
    /// tracker believes follows from what reaches the peer, never from a
    /// destination address the guest chose.
    pub fn peer_mac(mut self, mac: [u8; 6]) -> Self {
        self.peer_mac = Some(mac);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let id = &self.identity;
        if id.mac[0] & 1 != 0 || id.mac == [0; 6] {
            return Err("the MAC address must be unicast and not all zero".into());
        }
        if self
            .peer_mac
            .is_some_and(|mac| mac[0] & 1 != 0 || mac == [0; 6])
        {
            return Err("the peer's MAC address must be unicast and not all zero".into());
        }
        if id.prefix_len > 32 {
            return Err("the prefix length must be at most 32".into());
        }
        if self.tap.is_empty() || self.tap.len() >= libc::IFNAMSIZ {
            return Err("a TAP device name has 1 to 15 bytes".into());
        }
        Ok(())
    }
}

/// Counters of a VM's network device. Every frame the guest hands over is
/// either forwarded (`tx_frames`) or counted in exactly one `dropped_*`;
/// every frame read from the TAP device is either given to the guest
/// (`rx_frames`) or counted in `dropped_device` or `dropped_table_full`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetStats {
    /// Frames from the guest written to the TAP device.
    pub tx_frames: u64,
    /// Frames from the TAP device given to the guest.
    pub rx_frames: u64,
    /// `NetExchange` calls (each one exit).
    pub exchanges: u64,
    /// Guest frames whose source MAC or IP address (Ethernet, IPv4 or ARP
    /// sender) is not the guest's own.
    pub dropped_spoofed: u64,
    /// Guest frames longer than [`abi::NET_MAX_FRAME`] or shorter than an
    /// Ethernet header, and malformed frame records.
    pub dropped_malformed: u64,
    /// ARP frames over the guest's rate.
    pub dropped_arp_flood: u64,
    /// Guest frames of other protocols than IPv4 and ARP (IPv6 included).
    pub dropped_protocol: u64,
    /// Guest IPv4 fragments (of any protocol): the tracker cannot inspect
    /// what they carry, so they never leave.
    pub dropped_fragment: u64,
    /// Guest frames sent to another MAC address than the peer's
    /// ([`NetConfig::peer_mac`]), or, but for TCP, broadcast.
    pub dropped_destination: u64,
    /// SYNs for new connections beyond the tracker's table: the guest's
    /// are dropped, a peer's are refused (the peer gets a RST, the guest
    /// never sees the SYN).
    pub dropped_table_full: u64,
    /// SYNs for new connections over the guest's rate
    /// ([`NetConfig::syn_per_second`]).
    pub dropped_syn_rate: u64,
    /// Frames the host made on the guest's behalf (resets, refusals) that
    /// failed the checks a guest's own frame passes — another VM's
    /// identity, or not to the peer: never sent.
    pub dropped_host_frames: u64,
    /// Frames the TAP device refused (e.g. while its link is down), and
    /// frames from it longer than the guest can take.
    pub dropped_device: u64,
    /// Frames for the guest dropped because its queue was full.
    pub dropped_queue_full: u64,
    /// Connections ended by termination.
    pub terminated: u64,
}

/// Why a guest frame was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    Spoofed,
    Malformed,
    ArpFlood,
    Protocol,
    Fragment,
    Destination,
    TableFull,
    SynRate,
}

/// A token bucket: `per_second` tokens a second, at most `per_second` held.
#[derive(Debug)]
struct RateLimit {
    per_second: u32,
    tokens: u32,
    refilled: Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            tokens: per_second,
            refilled: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled);
        let earned = (elapsed.as_micros() * u128::from(self.per_second) / 1_000_000) as u64;
        if earned > 0 {
            self.tokens = (u64::from(self.tokens) + earned).min(u64::from(self.per_second)) as u32;
            self.refilled = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// One VM's device.
#[derive(Debug)]
pub(crate) struct NetDevice {
    tap: Tap,
    identity: NetIdentity,
    /// The MAC address of the guest's link peer (see
    /// [`NetConfig::peer_mac`]).
    peer_mac: [u8; 6],
    tracker: ConnTracker,
    /// Frames for the guest made by the host (resets), sent first.
    to_guest: VecDeque<Vec<u8>>,
    max_queued: usize,
    /// Frames for the guest, encoded, of the exchange in progress.
    pub(crate) rx_out: Vec<u8>,
    /// A frame read from the TAP device that did not fit `rx_out`.
    held: Option<Vec<u8>>,
    /// The guest's batch, copied out of its memory: the first bytes of a
    /// buffer of [`abi::NET_MAX_BATCH`] bytes, zeroed once.
    tx_in: Vec<u8>,
    /// Segments of the batch being merged into one.
    run: Run,
    /// One frame read from the TAP device.
    read_buf: Vec<u8>,
    arp_rate: RateLimit,
    syn_rate: RateLimit,
    stats: NetStats,
}

/// A frame's record in an exchange buffer: `u16` length, then the bytes.
const RECORD_HEADER: usize = 2;

impl NetDevice {
    pub(crate) fn open(config: &NetConfig) -> std::io::Result<Self> {
        let tap = Tap::open(&config.tap)?;
        let peer_mac = match config.peer_mac {
            Some(mac) => mac,
            None => tap.mac()?,
        };
        Ok(Self {
            tap,
            identity: config.identity,
            peer_mac,
            tracker: ConnTracker::new(config.tracker).with_link(config.identity.mac, peer_mac),
            to_guest: VecDeque::new(),
            max_queued: config.max_queued,
            rx_out: Vec::with_capacity(abi::NET_MAX_BATCH as usize),
            held: None,
            tx_in: vec![0; abi::NET_MAX_BATCH as usize],
            run: Run::default(),
            // Larger than any frame we accept, so a longer one is seen
            // (and dropped) rather than cut.
            read_buf: vec![0; 64 * 1024],
            arp_rate: RateLimit::new(config.arp_per_second),
            syn_rate: RateLimit::new(config.syn_per_second),
            stats: NetStats::default(),
        })
    }

    pub(crate) fn identity(&self) -> NetIdentity {
        self.identity
    }

    pub(crate) fn stats(&self) -> NetStats {
        self.stats
    }

    pub(crate) fn tracker(&self) -> &ConnTracker {
        &self.tracker
    }

    /// Where the guest's batch of `len` bytes is to be copied, `None` if
    /// `len` is over [`abi::NET_MAX_BATCH`].
    pub(crate) fn tx_buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        self.tx_in.get_mut(..len)
    }

    /// Sends every frame of the guest's batch (the first `len` bytes of
    /// [`Self::tx_buffer`]) that passes the checks; stops at a malformed
    /// record. Each frame is checked (and observed by the tracker) on its
    /// own, in order; consecutive TCP segments of one flow that passed are
    /// then written as one large segment ([`coalesce`](super::coalesce)).
    pub(crate) fn transmit_batch(&mut self, len: usize) {
        self.stats.exchanges += 1;
        let whole = std::mem::take(&mut self.tx_in);
        let batch = &whole[..len.min(whole.len())];
        let mut run = std::mem::take(&mut self.run);
        let mut at = 0;
        while at < batch.len() {
            let Some(&[a, b]) = batch.get(at..at + RECORD_HEADER) else {
                self.stats.dropped_malformed += 1;
                break;
            };
            let len = usize::from(u16::from_le_bytes([a, b]));
            let start = at + RECORD_HEADER;
            if len > batch.len() - start {
                self.stats.dropped_malformed += 1;
                break;
            }
            at = start + len;
            let frame = &batch[start..start + len];
            let seen = match self.check(frame) {
                Ok(seen) => seen,
                Err(refused) => {
                    self.count_refused(refused);
                    continue;
                }
            };
            // Only data segments merge; a segment that ends a connection
            // is written alone, so a failed write can reinstate it.
            let seg = match seen {
                Observation::Closed(_) => None,
                _ => Segment::parse(frame),
            };
            if let Some(seg) = seg {
                if run.push(batch, (start, len), seg) {
                    continue;
                }
                self.write_run(batch, &mut run);
                run.push(batch, (start, len), seg);
                continue;
            }
            self.write_run(batch, &mut run);
            if self.tap.write_frame(frame).is_ok() {
                self.stats.tx_frames += 1;
            } else {
                self.stats.dropped_device += 1;
                // The peer never saw this end of the connection.
                if let Observation::Closed(key) = seen {
                    self.tracker.reinstate(&key);
                }
            }
        }
        self.write_run(batch, &mut run);
        self.run = run;
        self.tx_in = whole;
    }

    /// Writes the frames of `run` (checked, data segments of one flow in
    /// sequence) as one, and empties it.
    fn write_run(&mut self, batch: &[u8], run: &mut Run) {
        let n = run.members().len() as u64;
        let written = match run.members() {
            [] => return,
            [(at, len)] => self.tap.write_frame(&batch[*at..*at + *len]),
            members => match run.merged_header(batch) {
                Some((head, hdr)) => {
                    let skip = run.hdr_len();
                    let mut parts: Vec<&[u8]> = Vec::with_capacity(members.len() + 1);
                    parts.push(&head);
                    parts.extend(members.iter().map(|&(at, len)| &batch[at + skip..at + len]));
                    self.tap.write_parts(hdr, &parts)
                }
                None => Err(std::io::ErrorKind::InvalidData.into()),
            },
        };
        if written.is_ok() {
            self.stats.tx_frames += n;
        } else {
            self.stats.dropped_device += n;
        }
        run.clear();
    }

    fn count_refused(&mut self, refused: Refused) {
        let counter = match refused {
            Refused::Spoofed => &mut self.stats.dropped_spoofed,
            Refused::Malformed => &mut self.stats.dropped_malformed,
            Refused::ArpFlood => &mut self.stats.dropped_arp_flood,
            Refused::Protocol => &mut self.stats.dropped_protocol,
            Refused::Fragment => &mut self.stats.dropped_fragment,
            Refused::Destination => &mut self.stats.dropped_destination,
            Refused::TableFull => &mut self.stats.dropped_table_full,
            Refused::SynRate => &mut self.stats.dropped_syn_rate,
        };
        *counter += 1;
    }

    /// Whether a guest frame may leave: its own addresses only, IPv4 and
    /// ARP only, within size and rate; TCP segments go through the tracker.
    /// Returns what the tracker made of it.
    fn check(&mut self, frame: &[u8]) -> Result<Observation, Refused> {
        match self.check_addresses(frame)? {
            EthernetProtocol::Ipv4 => {
                let syn_rate = &mut self.syn_rate;
                match self
                    .tracker
                    .observe_admitting(Direction::FromGuest, frame, |_| syn_rate.take())
                {
                    Observation::TableFull => Err(Refused::TableFull),
                    Observation::NotAdmitted => Err(Refused::SynRate),
                    // A TCP segment the tracker cannot read might still be
                    // one the peer takes in.
                    Observation::Malformed => Err(Refused::Malformed),
                    seen => Ok(seen),
                }
            }
            EthernetProtocol::Arp => {
                let eth = EthernetFrame::new_checked(frame).map_err(|_| Refused::Malformed)?;
                let arp = ArpPacket::new_checked(eth.payload()).map_err(|_| Refused::Malformed)?;
                if arp.hardware_len() != 6 || arp.protocol_len() != 4 {
                    return Err(Refused::Malformed);
                }
                let sender_ip = Ipv4Addr::from(
                    <[u8; 4]>::try_from(arp.source_protocol_addr())
                        .map_err(|_| Refused::Malformed)?,
                );
                let sender_ok = arp.source_hardware_addr() == self.identity.mac
                    && (sender_ip == self.identity.ip
                        // An ARP probe (RFC 5227) has sender IP 0.0.0.0.
                        || (sender_ip.is_unspecified()
                            && arp.operation() == ArpOperation::Request));
                if !sender_ok {
                    return Err(Refused::Spoofed);
                }
                if !self.arp_rate.take() {
                    return Err(Refused::ArpFlood);
                }
                Ok(Observation::NotTcp)
            }
            _ => Err(Refused::Protocol),
        }
    }

    /// The checks of every frame that leaves on the guest's behalf, the
    /// host's own (resets, refusals) included: size, the guest's own MAC
    /// and IPv4 addresses as source, the peer's MAC (or, but for TCP,
    /// broadcast) as destination, IPv4 or ARP, no IPv4 fragment. Returns
    /// the frame's protocol.
    fn check_addresses(&self, frame: &[u8]) -> Result<EthernetProtocol, Refused> {
        if frame.len() > abi::NET_MAX_FRAME as usize {
            return Err(Refused::Malformed);
        }
        let eth = EthernetFrame::new_checked(frame).map_err(|_| Refused::Malformed)?;
        if eth.src_addr().0 != self.identity.mac {
            return Err(Refused::Spoofed);
        }
        // Frames go to the peer (a broadcast reaches it too, but its TCP
        // drops one): the tracker must never believe a frame the peer does
        // not take in.
        let dst = eth.dst_addr().0;
        let to_peer = dst == self.peer_mac;
        if !to_peer && dst != [0xff; 6] {
            return Err(Refused::Destination);
        }
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                let ip = Ipv4Packet::new_checked(eth.payload()).map_err(|_| Refused::Malformed)?;
                if ip.src_addr() != self.identity.ip {
                    return Err(Refused::Spoofed);
                }
                // The peer would reassemble fragments; the tracker does
                // not, so none leaves.
                if ip.more_frags() || ip.frag_offset() != 0 {
                    return Err(Refused::Fragment);
                }
                if ip.next_header() == IpProtocol::Tcp && !to_peer {
                    return Err(Refused::Destination);
                }
                Ok(EthernetProtocol::Ipv4)
            }
            EthernetProtocol::Arp => Ok(EthernetProtocol::Arp),
            _ => Err(Refused::Protocol),
        }
    }

    /// Whether a frame from the TAP device is addressed to this guest (its
    /// MAC, and its IPv4 address if IPv4): only those can be its
    /// connections. On a shared link a frame for another VM can arrive
    /// here (a bridge floods unknown destinations); its connection is not
    /// this VM's to track or end.
    fn for_guest(&self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        if eth.dst_addr().0 != self.identity.mac {
            return false;
        }
        eth.ethertype() != EthernetProtocol::Ipv4
            || Ipv4Packet::new_checked(eth.payload())
                .is_ok_and(|ip| ip.dst_addr() == self.identity.ip)
    }

    /// Appends one frame for the guest to `rx_out` if it fits in `cap`.
    fn push_rx(&mut self, frame: &[u8], cap: usize) -> bool {
        if self.rx_out.len() + RECORD_HEADER + frame.len() > cap {
            return false;
        }
        self.rx_out
            .extend_from_slice(&(frame.len() as u16).to_le_bytes());
        self.rx_out.extend_from_slice(frame);
        self.stats.rx_frames += 1;
        true
    }

    /// Collects frames for the guest into `rx_out` (at most `cap` bytes):
    /// first the host's own, then what waits on the TAP device.
    pub(crate) fn fill_rx(&mut self, cap: usize) {
        while let Some(frame) = self.to_guest.pop_front() {
            if !self.push_rx(&frame, cap) {
                self.to_guest.push_front(frame);
                return;
            }
        }
        if let Some(frame) = self.held.take() {
            if !self.push_rx(&frame, cap) {
                self.held = Some(frame);
                return;
            }
        }
        loop {
            let n = match self.tap.read_frame(&mut self.read_buf) {
                Ok(Some((hdr, n))) => {
                    if n > abi::NET_MAX_FRAME as usize
                        || !finish_checksum(hdr, &mut self.read_buf[..n])
                    {
                        self.stats.dropped_device += 1;
                        continue;
                    }
                    n
                }
                Ok(None) => return,
                Err(_) => {
                    self.stats.dropped_device += 1;
                    return;
                }
            };
            let frame = std::mem::take(&mut self.read_buf);
            if self.for_guest(&frame[..n])
                && self.tracker.observe(Direction::ToGuest, &frame[..n]) == Observation::TableFull
            {
                // A peer's SYN the tracker cannot follow must not become a
                // connection: the guest never sees it, the peer gets the
                // answer of a closed port.
                self.stats.dropped_table_full += 1;
                if let Some(rst) = tracker::refusal(&frame[..n], self.identity.mac, self.peer_mac) {
                    self.write_host_frame(&rst);
                }
                self.read_buf = frame;
                continue;
            }
            let fitted = self.push_rx(&frame[..n], cap);
            if !fitted {
                self.held = Some(frame[..n].to_vec());
            }
            self.read_buf = frame;
            if !fitted {
                return;
            }
        }
    }

    /// Waits up to `timeout` for a frame on the TAP device.
    pub(crate) fn wait_readable(&self, timeout: Duration) -> Readiness {
        if !self.to_guest.is_empty() || self.held.is_some() {
            return Readiness::Readable;
        }
        self.tap
            .wait_readable(timeout)
            .unwrap_or(Readiness::Interrupted)
    }

    /// Queues a frame for the guest; dropped (and counted) when the queue
    /// is full.
    pub(crate) fn queue_to_guest(&mut self, frame: Vec<u8>) {
        if self.to_guest.len() >= self.max_queued {
            self.stats.dropped_queue_full += 1;
            return;
        }
        self.to_guest.push_back(frame);
    }

    /// Whether frames wait for the guest.
    pub(crate) fn has_queued(&self) -> bool {
        !self.to_guest.is_empty()
    }

    /// Writes a frame the host made on the guest's behalf (a reset, a
    /// refusal) to the TAP device, if it passes the checks a guest's own
    /// frame passes: it carries only this VM's identity, and goes to the
    /// peer.
    fn write_host_frame(&mut self, frame: &[u8]) {
        if self.check_addresses(frame) != Ok(EthernetProtocol::Ipv4) {
            self.stats.dropped_host_frames += 1;
            return;
        }
        if self.tap.write_frame(frame).is_err() {
            self.stats.dropped_device += 1;
        }
    }

    /// Whether a connection saved with a snapshot was captured under this
    /// VM's identity (its IPv4 and MAC address). Only those are this VM's
    /// to track and end; the others belong to the VM the snapshot was
    /// taken from.
    fn is_own(&self, conn: &Connection) -> bool {
        *conn.key.guest.ip() == self.identity.ip && conn.guest_mac == self.identity.mac
    }

    /// Sends the peer-side reset of every tracked connection whose key
    /// `saved` does not hold, then makes those of `saved` captured under
    /// this VM's identity the tracked set (as far as the table allows); a
    /// clone never adopts the connections of the VM it was cloned from.
    /// Returns how many connections were ended.
    pub(crate) fn reset_to(&mut self, saved: &[Connection]) -> usize {
        let keep: std::collections::BTreeSet<ConnKey> = saved.iter().map(|c| c.key).collect();
        let stale: Vec<ConnKey> = self
            .tracker
            .connections()
            .map(|c| c.key)
            .filter(|k| !keep.contains(k))
            .collect();
        for key in &stale {
            let Some(t) = self.tracker.terminate(key) else {
                continue;
            };
            for f in &t.to_peer {
                self.write_host_frame(f);
            }
        }
        self.stats.terminated += stale.len() as u64;
        // Frames the host queued for the guest before the rewind (resets
        // of a previous one it never took in) mean nothing to it after.
        self.to_guest.clear();
        self.tracker.clear();
        for c in saved {
            if self.is_own(c) {
                self.tracker.insert(*c);
            }
        }
        stale.len()
    }

    /// Ends every tracked connection: the peers' resets go out on the TAP
    /// device now, the guest's are queued for its next exchange. Returns
    /// how many connections were ended.
    pub(crate) fn terminate_all(&mut self) -> usize {
        let terms = self.tracker.terminate_all();
        for t in &terms {
            for f in &t.to_peer {
                self.write_host_frame(f);
            }
        }
        for t in terms.iter() {
            for f in &t.to_guest {
                self.queue_to_guest(f.clone());
            }
        }
        self.stats.terminated += terms.len() as u64;
        terms.len()
    }
}

/// Makes a frame read from the TAP device whole: completes a checksum the
/// kernel left to the device (`VIRTIO_NET_HDR_F_NEEDS_CSUM`; receive
/// offloads are off, so it should not). `false` for a frame that cannot be
/// made whole: a large segment (never sent without `TUN_F_TSO4`) or a
/// checksum place outside the frame.
fn finish_checksum(hdr: VnetHdr, frame: &mut [u8]) -> bool {
    if hdr.gso_type != VnetHdr::GSO_NONE {
        return false;
    }
    if hdr.flags & VnetHdr::NEEDS_CSUM == 0 {
        return true;
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if start >= frame.len() || at + 2 > frame.len() {
        return false;
    }
    let sum = !super::coalesce::fold(super::coalesce::sum(&frame[start..]));
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

impl Drop for NetDevice {
    /// A VM that goes away takes its connections with it: each peer gets
    /// its reset now instead of keeping a half-open connection.
    fn drop(&mut self) {
        self.reset_to(&[]);
    }
}
