//! [`Tap`]: a Linux TAP device, opened by name.
//!
//! The system calls (`TUNSETIFF`, `poll(2)`) are `sys::tap`'s and
//! `sys::poll`'s.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

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
