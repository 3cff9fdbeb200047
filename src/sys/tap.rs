//! TAP devices: attaching to one by name through `/dev/net/tun`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// Bytes of the `struct virtio_net_hdr` before every frame read from or
/// written to a device opened with `IFF_VNET_HDR` (the kernel's default
/// size, not changed with `TUNSETVNETHDRSZ`).
pub(crate) const VNET_HDR_LEN: usize = 10;

/// Opens `/dev/net/tun` (non-blocking) and attaches it to TAP device `name`
/// (whole Ethernet frames, each after a `struct virtio_net_hdr` of
/// [`VNET_HDR_LEN`] bytes, no packet information header), creating the
/// device if it is missing and the process may. `name` has 1 to 15 bytes
/// and no NUL.
pub(crate) fn open_tap(name: &str) -> io::Result<File> {
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
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF on the tun device reads (and writes back) a
    // `struct ifreq` of 40 bytes; `req` is one, laid out as the kernel
    // expects (the NUL-terminated name, then the flags at offset 16), and
    // lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// `struct ifreq` as `SIOCGIFHWADDR` fills it: the name, then a
/// `struct sockaddr` (family, then the address bytes).
#[repr(C)]
struct IfReqHwAddr {
    name: [u8; libc::IFNAMSIZ],
    family: libc::sa_family_t,
    data: [u8; 14],
    _pad: [u8; 8],
}

const _: () = assert!(std::mem::size_of::<IfReqHwAddr>() == 40);

/// The MAC address of the TAP device `file` is attached to (the host's
/// side of the link, not the guest's).
pub(crate) fn tap_mac(file: &File) -> io::Result<[u8; 6]> {
    let mut req = IfReqHwAddr {
        name: [0; libc::IFNAMSIZ],
        family: 0,
        data: [0; 14],
        _pad: [0; 8],
    };
    // SAFETY: SIOCGIFHWADDR on an attached tun file writes a `struct
    // ifreq` of 40 bytes (the device's name and its hardware address as a
    // `struct sockaddr`); `req` is one, laid out as the kernel expects, and
    // lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&req.data[..6]);
    Ok(mac)
}
