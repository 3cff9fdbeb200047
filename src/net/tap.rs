//! [`Tap`]: a Linux TAP device, opened by name.
//!
//! The system calls (`TUNSETIFF`, `poll(2)`) are `sys::tap`'s and
//! `sys::poll`'s.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use crate::sys::tap::VNET_HDR_LEN;

/// An open TAP device: whole Ethernet frames in and out, each behind a
/// `struct virtio_net_hdr`, no packet information header,
/// non-blocking. No receive offloads are enabled (`TUNSETOFFLOAD` is never
/// called), so frames read are whole, at most the link's MTU, and carry
/// their checksums.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// The `struct virtio_net_hdr` before each frame (native, little-endian
/// layout of a legacy header): how the kernel is to finish a frame the
/// host wrote — complete its TCP checksum, cut it into segments — or what
/// a frame it read still needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Bytes of the headers (Ethernet, IP, TCP) of a large segment.
    pub hdr_len: u16,
    /// Payload bytes of each segment a large one is cut into.
    pub gso_size: u16,
    /// Where the checksummed part starts (with [`VnetHdr::NEEDS_CSUM`]).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
    /// csum_offset` holds only the pseudo-header's sum; the rest is to be
    /// added over the bytes from `csum_start` (not computed at all for
    /// local delivery, which trusts it).
    pub const NEEDS_CSUM: u8 = 1;
    /// `VIRTIO_NET_HDR_GSO_NONE`.
    pub const GSO_NONE: u8 = 0;
    /// `VIRTIO_NET_HDR_GSO_TCPV4`: an IPv4 TCP segment larger than the
    /// MTU, to be cut into `gso_size` payloads where it must be.
    pub const GSO_TCPV4: u8 = 1;

    fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]),
            gso_size: u16::from_le_bytes([b[4], b[5]]),
            csum_start: u16::from_le_bytes([b[6], b[7]]),
            csum_offset: u16::from_le_bytes([b[8], b[9]]),
        }
    }
}

/// What [`Tap::wait_readable`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// A frame can be read.
    Readable,
    /// The wait ran out.
    TimedOut,
    /// A signal interrupted the wait (the call's timer, or an interrupt).
    Interrupted,
}

impl Tap {
    /// Attaches to TAP device `name` (created with
    /// `ip tuntap add dev NAME mode tap`, or created here if missing and
    /// the process may do so).
    pub fn open(name: &str) -> io::Result<Self> {
        let file = crate::sys::tap::open_tap(name)?;
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The MAC address of the host's side of the device, asked of the
    /// kernel (recent kernels look the device up by name in the network
    /// namespace it was opened in, so this fails once it moved to another).
    pub fn mac(&self) -> io::Result<[u8; 6]> {
        crate::sys::tap::tap_mac(&self.file)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`, with its header; `Ok(None)` when none is
    /// waiting. A frame longer than `buf` is cut to it (the length returned
    /// is what was read).
    pub(crate) fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<(VnetHdr, usize)>> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        let mut parts = [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)];
        match self.file.read_vectored(&mut parts) {
            Ok(n) if n < VNET_HDR_LEN => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a read from the TAP device shorter than its header",
            )),
            Ok(n) => Ok(Some((VnetHdr::from_bytes(&hdr), n - VNET_HDR_LEN))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame, complete (checksums included).
    pub(crate) fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.write_parts(VnetHdr::default(), &[frame])
    }

    /// Writes one frame made of `parts` behind `hdr`, in one system call.
    /// A frame the kernel takes is taken whole.
    pub(crate) fn write_parts(&mut self, hdr: VnetHdr, parts: &[&[u8]]) -> io::Result<()> {
        let hdr = hdr.to_bytes();
        let want = VNET_HDR_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        let n = match parts {
            // A frame of its own (the common case but for bulk data): no
            // allocation.
            [frame] => self
                .file
                .write_vectored(&[IoSlice::new(&hdr), IoSlice::new(frame)])?,
            _ => {
                let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
                iov.push(IoSlice::new(&hdr));
                iov.extend(parts.iter().map(|p| IoSlice::new(p)));
                self.file.write_vectored(&iov)?
            }
        };
        if n != want {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the TAP device took part of a frame",
            ));
        }
        Ok(())
    }

    /// Waits until a frame can be read, up to `timeout`.
    pub(crate) fn wait_readable(&self, timeout: Duration) -> io::Result<Readiness> {
        // Round up, so a short wait is not a busy loop of zero timeouts.
        let ms = timeout
            .as_micros()
            .div_ceil(1000)
            .min(libc::c_int::MAX as u128) as libc::c_int;
        match crate::sys::poll::poll_readable([self.file.as_fd()], ms) {
            Ok([true]) => Ok(Readiness::Readable),
            Ok([false]) => Ok(Readiness::TimedOut),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Readiness::Interrupted),
            Err(e) => Err(e),
        }
    }
}
