//! `poll(2)`: waiting for descriptors to become readable.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Waits until one of `fds` is readable (or reports an error or hang-up),
/// for at most `timeout_ms` milliseconds (-1: no limit). Returns, per
/// descriptor, whether it is ready: all `false` when the time ran out. A
/// signal ends the wait early with [`io::ErrorKind::Interrupted`].
pub(crate) fn poll_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout_ms: libc::c_int,
) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `pfds` is an array of `N` initialised pollfds that lives for
    // the call and whose length is passed along; the descriptors are
    // borrowed, so open, for the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfds.map(|p| p.revents != 0))
}
