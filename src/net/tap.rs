//! [`Tap`]: a Linux TAP device, opened by name.
//!
//! The only `unsafe` of the network device lives here: the `TUNSETIFF`
//! ioctl and `poll(2)` on the device's own descriptor.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device: whole Ethernet frames in and out, no packet
/// information header, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
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
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TAP device name has 1 to 15 bytes",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back) a `struct ifreq` of 40
        // bytes; `req` is one, laid out as the kernel expects (name, then
        // the flags at offset 16), and lives across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`; `Ok(None)` when none is waiting. A frame
    /// longer than `buf` is cut to it (the caller sees the full length).
    pub(crate) fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame.
    pub(crate) fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write(frame).map(drop)
    }

    /// Waits until a frame can be read, up to `timeout`.
    pub(crate) fn wait_readable(&self, timeout: Duration) -> io::Result<Readiness> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up, so a short wait is not a busy loop of zero timeouts.
        let ms = timeout
            .as_micros()
            .div_ceil(1000)
            .min(libc::c_int::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd for this call's duration, and
        // the count passed is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Readiness::Interrupted);
            }
            return Err(e);
        }
        Ok(if rc == 0 {
            Readiness::TimedOut
        } else {
            Readiness::Readable
        })
    }
}
