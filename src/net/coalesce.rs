//! Merging a guest's consecutive TCP segments into one large segment for
//! the TAP device (`VIRTIO_NET_HDR_GSO_TCPV4`), the way GRO merges them on
//! a NIC's receive path: one write and one pass through the peer's stack
//! for a whole batch of a bulk transfer instead of one per 1460 bytes.
//!
//! Pure packet logic on frames the device already checked one by one (and
//! the tracker observed one by one): merging never lets a frame through
//! that would not have gone alone, and the large segment carries exactly
//! the members' bytes, in order, under the first member's headers. The
//! peer's kernel takes it in whole when it delivers locally and cuts it
//! back into `gso_size` segments where it must (forwarding to a link with
//! a smaller MTU).

use super::tap::VnetHdr;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_AT: usize = ETH_LEN + IP_LEN;
/// TCP flags a mergeable segment may carry: ACK, and PSH on the last one.
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
/// The largest IPv4 packet.
const MAX_IP_LEN: usize = 65535;

/// A TCP segment that can be part of a merged one: IPv4 without options,
/// ACK (and perhaps PSH) as its only flags, a payload, and no Ethernet
/// padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Bytes of the Ethernet, IPv4 and TCP headers.
    hdr_len: usize,
    /// Bytes of payload.
    payload: usize,
    seq: u32,
    psh: bool,
}

impl Segment {
    /// The segment `frame` is, if it can be merged.
    pub(crate) fn parse(frame: &[u8]) -> Option<Self> {
        let ip = frame.get(ETH_LEN..)?;
        let tcp = frame.get(TCP_AT..)?;
        if frame[12..14] != [0x08, 0x00] || ip.len() < IP_LEN || ip[0] != 0x45 || ip[9] != 6 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if total != ip.len() || tcp.len() < 20 {
            return None;
        }
        let doff = usize::from(tcp[12] >> 4) * 4;
        let flags = tcp[13];
        if doff < 20 || doff > tcp.len() || tcp[12] & 0x0f != 0 || flags & !PSH != ACK {
            return None;
        }
        let payload = tcp.len() - doff;
        (payload > 0).then_some(Self {
            hdr_len: TCP_AT + doff,
            payload,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            psh: flags & PSH != 0,
        })
    }
}

/// A run of mergeable segments, by their places in the batch.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// `(offset, len)` of each member frame.
    members: Vec<(usize, usize)>,
    first: Option<Segment>,
    last: Option<Segment>,
    /// Bytes of the IPv4 packet the run makes.
    ip_len: usize,
}

/// Whether two members' headers (of equal length) agree but where members
/// may differ: IPv4 total length (16..18), identification (18..20) and
/// checksum (24..26); TCP sequence number (38..42) and checksum (50..52);
/// PSH in the flags byte (47).
fn same_headers(a: &[u8], b: &[u8]) -> bool {
    let same = |r: std::ops::Range<usize>| a.get(r.clone()) == b.get(r);
    same(0..16)
        && same(20..24)
        && same(26..38)
        && same(42..47)
        && a.get(47).map(|f| f & !PSH) == b.get(47).map(|f| f & !PSH)
        && same(48..50)
        && a.get(52..) == b.get(52..)
}

impl Run {
    /// The member frames' places in the batch.
    pub(crate) fn members(&self) -> &[(usize, usize)] {
        &self.members
    }

    /// Forgets every member.
    pub(crate) fn clear(&mut self) {
        self.members.clear();
        self.first = None;
        self.last = None;
        self.ip_len = 0;
    }

    /// Adds the segment at `at` of `batch` if it continues the run (or
    /// starts it); `false` if it does not (the run is unchanged).
    pub(crate) fn push(&mut self, batch: &[u8], at: (usize, usize), seg: Segment) -> bool {
        let frame = &batch[at.0..at.0 + at.1];
        let (Some(first), Some(last)) = (self.first, self.last) else {
            self.members.push(at);
            self.first = Some(seg);
            self.last = Some(seg);
            self.ip_len = at.1 - ETH_LEN;
            return true;
        };
        let head = &batch[self.members[0].0..self.members[0].0 + first.hdr_len];
        let continues = !last.psh
            && last.payload == first.payload
            && seg.payload <= first.payload
            && seg.hdr_len == first.hdr_len
            && seg.seq == last.seq.wrapping_add(last.payload as u32)
            && self.ip_len + seg.payload <= MAX_IP_LEN
            && same_headers(head, &frame[..seg.hdr_len]);
        if continues {
            self.members.push(at);
            self.last = Some(seg);
            self.ip_len += seg.payload;
        }
        continues
    }

    /// The headers and the `virtio_net_hdr` of the merged segment (a run of
    /// at least two members): the first member's headers with the total
    /// length, a fresh IPv4 checksum, PSH if the last member had it, and
    /// the pseudo-header's sum as TCP checksum for the kernel to finish.
    /// Its payloads follow: each member's bytes after `hdr_len`.
    pub(crate) fn merged_header(&self, batch: &[u8]) -> Option<(Vec<u8>, VnetHdr)> {
        let (first, last) = (self.first?, self.last?);
        let at = self.members.first()?;
        let mut head = batch.get(at.0..at.0 + first.hdr_len)?.to_vec();
        let ip_len = u16::try_from(self.ip_len).ok()?;
        head[16..18].copy_from_slice(&ip_len.to_be_bytes());
        head[24..26].copy_from_slice(&[0, 0]);
        let ip_sum = !fold(sum(&head[ETH_LEN..TCP_AT]));
        head[24..26].copy_from_slice(&ip_sum.to_be_bytes());
        if last.psh {
            head[TCP_AT + 13] |= PSH;
        }
        let tcp_len = self.ip_len - IP_LEN;
        let pseudo = sum(&head[26..34]) + 6 + tcp_len as u64;
        head[TCP_AT + 16..TCP_AT + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
        let hdr = VnetHdr {
            flags: VnetHdr::NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV4,
            hdr_len: first.hdr_len as u16,
            gso_size: first.payload as u16,
            csum_start: TCP_AT as u16,
            csum_offset: 16,
        };
        Some((head, hdr))
    }

    /// Bytes of headers each member starts with.
    pub(crate) fn hdr_len(&self) -> usize {
        self.first.map_or(0, |s| s.hdr_len)
    }
}

/// The ones' complement sum of `data` as big-endian 16-bit words, not
/// folded.
pub(crate) fn sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut acc: u64 = 0;
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u64::from(*b) << 8;
    }
    acc
}

/// Folds a sum of 16-bit words into 16 bits.
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, Ipv4Address, Ipv4Packet, TcpPacket};

    const SRC: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
    const DST: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);

    /// A complete frame: guest → peer, `flags`, `len` payload bytes (each
    /// the low byte of its sequence number), valid checksums.
    fn segment(seq: u32, len: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; TCP_AT + 20 + len];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip_len = (IP_LEN + 20 + len) as u16;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&ip_len.to_be_bytes());
        f[18..20].copy_from_slice(&(seq as u16).to_be_bytes());
        f[20] = 0x40; // DF
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&SRC.octets());
        f[30..34].copy_from_slice(&DST.octets());
        f[34..36].copy_from_slice(&50000u16.to_be_bytes());
        f[36..38].copy_from_slice(&7001u16.to_be_bytes());
        f[38..42].copy_from_slice(&seq.to_be_bytes());
        f[42..46].copy_from_slice(&777u32.to_be_bytes());
        f[46] = 5 << 4;
        f[47] = flags;
        f[48..50].copy_from_slice(&4096u16.to_be_bytes());
        for (i, b) in f[TCP_AT + 20..].iter_mut().enumerate() {
            *b = seq.wrapping_add(i as u32) as u8;
        }
        Ipv4Packet::new_unchecked(&mut f[ETH_LEN..]).fill_checksum();
        TcpPacket::new_unchecked(&mut f[TCP_AT..])
            .fill_checksum(&IpAddress::Ipv4(SRC), &IpAddress::Ipv4(DST));
        f
    }

    /// Frames as a guest batch: records of a `u16` length and the bytes.
    fn batch(frames: &[Vec<u8>]) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut b = Vec::new();
        let mut at = Vec::new();
        for f in frames {
            b.extend_from_slice(&(f.len() as u16).to_le_bytes());
            at.push((b.len(), f.len()));
            b.extend_from_slice(f);
        }
        (b, at)
    }

    /// How many leading frames one run takes.
    fn run_len(frames: &[Vec<u8>]) -> usize {
        let (b, at) = batch(frames);
        let mut run = Run::default();
        at.iter()
            .take_while(|&&(o, l)| {
                Segment::parse(&b[o..o + l]).is_some_and(|s| run.push(&b, (o, l), s))
            })
            .count()
    }

    /// The merged frame, its checksum completed as the kernel would.
    fn merged(frames: &[Vec<u8>]) -> (Vec<u8>, VnetHdr) {
        let (b, at) = batch(frames);
        let mut run = Run::default();
        for &(o, l) in &at {
            assert!(run.push(&b, (o, l), Segment::parse(&b[o..o + l]).unwrap()));
        }
        let (mut frame, hdr) = run.merged_header(&b).unwrap();
        for &(o, l) in run.members() {
            frame.extend_from_slice(&b[o + run.hdr_len()..o + l]);
        }
        let start = usize::from(hdr.csum_start);
        let at = start + usize::from(hdr.csum_offset);
        let sum = !fold(sum(&frame[start..]));
        frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        (frame, hdr)
    }

    #[test]
    fn a_merged_segment_carries_exactly_its_members() {
        let mss = 1460;
        let mut seq = 1_000u32.wrapping_sub(3000); // wraps inside the run
        let mut frames = Vec::new();
        for i in 0..5 {
            let (len, flags) = if i == 4 { (300, ACK | PSH) } else { (mss, ACK) };
            frames.push(segment(seq, len, flags));
            seq = seq.wrapping_add(len as u32);
        }
        let (frame, hdr) = merged(&frames);
        assert_eq!(hdr.gso_type, VnetHdr::GSO_TCPV4);
        assert_eq!(hdr.flags, VnetHdr::NEEDS_CSUM);
        assert_eq!((hdr.gso_size, hdr.hdr_len), (mss as u16, 54));
        let ip = Ipv4Packet::new_checked(&frame[ETH_LEN..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(usize::from(ip.total_len()), frame.len() - ETH_LEN);
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(&IpAddress::Ipv4(SRC), &IpAddress::Ipv4(DST)));
        assert!(tcp.psh() && tcp.ack() && !tcp.syn() && !tcp.fin());
        assert_eq!(tcp.seq_number().0 as u32, 1_000u32.wrapping_sub(3000));
        // The oracle: cut back into `gso_size` payloads, the members'.
        let payloads: Vec<&[u8]> = tcp.payload().chunks(mss).collect();
        assert_eq!(payloads.len(), frames.len());
        for (p, f) in payloads.iter().zip(&frames) {
            assert_eq!(*p, &f[54..]);
        }
        // Everything else is the first member's.
        assert_eq!(frame[..16], frames[0][..16]);
        assert_eq!(frame[20..24], frames[0][20..24]);
        assert_eq!(frame[26..47], frames[0][26..47]);
        assert_eq!(frame[48..50], frames[0][48..50]);
    }

    #[test]
    fn only_segments_that_continue_the_run_join_it() {
        let a = segment(100, 1000, ACK);
        let b = segment(1100, 1000, ACK);
        assert_eq!(run_len(&[a.clone(), b.clone()]), 2);
        // A gap, an overlap, a retransmission.
        assert_eq!(run_len(&[a.clone(), segment(1101, 1000, ACK)]), 1);
        assert_eq!(run_len(&[a.clone(), segment(1000, 1000, ACK)]), 1);
        assert_eq!(run_len(&[a.clone(), a.clone()]), 1);
        // Longer than the first; after a short one; after PSH.
        assert_eq!(run_len(&[a.clone(), segment(1100, 1001, ACK)]), 1);
        assert_eq!(
            run_len(&[segment(100, 500, ACK), segment(600, 500, ACK), b.clone()]),
            2
        );
        assert_eq!(run_len(&[segment(100, 1000, ACK | PSH), b.clone()]), 1);
        // Any header field but length, id, checksums and PSH differs.
        let may_differ = [16, 17, 18, 19, 24, 25, 38, 39, 40, 41, 50, 51];
        for at in (0..54).filter(|i| !may_differ.contains(i)) {
            let mut c = b.clone();
            c[at] ^= 1;
            assert_eq!(run_len(&[a.clone(), c]), 1, "byte {at}");
        }
        // Other flags never merge, nor does a segment without payload.
        for flags in [
            0,
            ACK | 0x01,
            ACK | 0x02,
            ACK | 0x04,
            ACK | 0x20,
            ACK | 0x40,
            ACK | 0x80,
        ] {
            assert_eq!(Segment::parse(&segment(1, 10, flags)), None, "{flags:#x}");
        }
        assert_eq!(Segment::parse(&segment(1, 0, ACK)), None);
        // No IP options, no TCP option mismatch, no padding.
        let mut opt = segment(1, 10, ACK);
        opt[14] = 0x46;
        assert_eq!(Segment::parse(&opt), None);
        let mut padded = segment(1, 10, ACK);
        padded.push(0);
        assert_eq!(Segment::parse(&padded), None);
    }

    #[test]
    fn a_run_stays_within_an_ipv4_packet() {
        let frames: Vec<Vec<u8>> = (0..50u32).map(|i| segment(i * 1460, 1460, ACK)).collect();
        let n = run_len(&frames);
        assert_eq!(n, (MAX_IP_LEN - 40) / 1460);
        let (frame, _) = merged(&frames[..n]);
        assert!(frame.len() - ETH_LEN <= MAX_IP_LEN);
    }

    #[test]
    fn parsing_never_panics() {
        let f = segment(7, 100, ACK);
        for n in 0..f.len() {
            let _ = Segment::parse(&f[..n]);
        }
        let mut rng = 0x1234_5678_u64;
        for _ in 0..20_000 {
            let mut g = f.clone();
            for _ in 0..4 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let at = (rng >> 33) as usize % g.len();
                g[at] = (rng >> 20) as u8;
            }
            let (b, at) = batch(&[f.clone(), g]);
            let mut run = Run::default();
            for &(o, l) in &at {
                if let Some(s) = Segment::parse(&b[o..o + l]) {
                    run.push(&b, (o, l), s);
                }
            }
            if run.members().len() > 1 {
                let _ = run.merged_header(&b).unwrap();
            }
        }
    }
}
