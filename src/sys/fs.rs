//! Files: opening beneath a directory without following links (the `*at`
//! system calls and `openat2`), memfds, and the sparse-file and read-ahead
//! calls snapshot images use, and the one way to open a file from a directory
//! another process can write ([`open_untrusted`]).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `dir` is a live descriptor and `name` a NUL-terminated
        // string, both borrowed for the duration of the call; the kernel
        // reads nothing else.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        match cvt(fd) {
            // SAFETY: the kernel just returned this descriptor to us; nothing
            // else owns it.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `struct open_how` of `linux/openat2.h` (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

/// `openat2(dir, path, flags | O_CLOEXEC)` resolving strictly beneath `dir`
/// without following any symlink.
pub(crate) fn openat2_beneath(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    loop {
        // SAFETY: `dir` is a live descriptor, `path` a NUL-terminated string
        // and `how` an initialised `open_how` whose size is passed along;
        // all outlive the call, and the kernel only reads them.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted || e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err(e);
        }
        // SAFETY: a non-negative return is a descriptor the kernel just
        // opened for us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) });
    }
}

/// The file type bits (`S_IFMT`) of `name` in `dir`, without following a
/// symlink.
pub(crate) fn file_type_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::mode_t> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `dir` is live, `name` NUL-terminated, and `st` points to
    // writable memory of the size of `struct stat`, which the call fills.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() }.st_mode & libc::S_IFMT)
}

/// `mkdirat(dir, name, 0o777)`; whether it created the directory.
pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    // SAFETY: `dir` is live and `name` NUL-terminated for the call.
    match cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o777) }) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// `renameat(from_dir, from, to_dir, to)`.
pub(crate) fn renameat(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
) -> io::Result<()> {
    // SAFETY: both descriptors are live and both names NUL-terminated for
    // the duration of the call.
    cvt(unsafe {
        libc::renameat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
        )
    })
    .map(|_| ())
}

/// `unlinkat(dir, name, 0)`: removes a file (or the symlink itself, never
/// its target).
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: `dir` is live and `name` NUL-terminated for the call.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(|_| ())
}

/// A new memfd named `name` (close-on-exec): an anonymous file in memory.
pub(crate) fn memfd(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is NUL-terminated and borrowed for the call; the
    // returned fd is new and owned by the `File` built from it (checked for
    // failure first).
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn lseek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).unwrap_or(libc::off_t::MAX);
    // SAFETY: lseek on a descriptor `file` owns, borrowed for the call; it
    // only moves the file offset (positioned reads and mappings do not use
    // it).
    let pos = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if pos < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(pos as u64))
}

/// The start of the first data region of `file` at or after `from`
/// (`SEEK_DATA`); `None` when there is no data after it.
pub(crate) fn seek_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    lseek(file, from, libc::SEEK_DATA)
}

/// The start of the first hole of `file` at or after `from` (`SEEK_HOLE`;
/// the end of the file counts as one); `None` when `from` is past the end.
pub(crate) fn seek_hole(file: &File, from: u64) -> io::Result<Option<u64>> {
    lseek(file, from, libc::SEEK_HOLE)
}

/// Asks the kernel to read `len` bytes of `file` at `offset` into the page
/// cache (`POSIX_FADV_WILLNEED`). Advisory: errors are ignored.
pub(crate) fn will_need(file: &File, offset: libc::off_t, len: libc::off_t) {
    // SAFETY: posix_fadvise on a descriptor `file` owns, borrowed for the
    // call; it only starts reads into the page cache.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED);
    }
}

/// Flags for reading a file from a directory another process can write:
/// read-only, no symlink followed as the last component (`O_NOFOLLOW`),
/// no wait for a writer on a FIFO or for a device (`O_NONBLOCK`), no
/// controlling terminal acquired (`O_NOCTTY`), closed on exec.
pub(crate) const UNTRUSTED_READ_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// Why a file from a directory another process can write was refused
/// ([`open_untrusted`], [`check_untrusted`]). Callers map it to their own
/// typed errors.
#[derive(Debug)]
pub(crate) enum UntrustedError {
    /// Opening failed (a missing file is of kind `NotFound`).
    Open(io::Error),
    /// The last component is a symbolic link (never followed).
    Symlink,
    /// `fstat` of the open file failed.
    Stat(io::Error),
    /// Not a regular file: a FIFO, a device, a socket or a directory.
    NotAFile,
    /// Longer than the caller's limit (checked before any byte is read, and
    /// again while reading, in case the file grew).
    TooLarge {
        /// Its length (at least this, when it grew while being read).
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Reading failed.
    Read(io::Error),
}

/// A regular file, opened without following a link or blocking, whose
/// length was within its limit when checked.
#[derive(Debug)]
pub(crate) struct UntrustedFile {
    /// The open file.
    pub(crate) file: File,
    /// Its length by `fstat`.
    pub(crate) len: u64,
    limit: u64,
}

impl UntrustedFile {
    /// Reads the whole file: at most `limit` bytes (the file may have grown
    /// since `fstat`; then it is [`UntrustedError::TooLarge`]), allocating
    /// no more than the checked length up front.
    pub(crate) fn read_all(self) -> Result<Vec<u8>, UntrustedError> {
        use std::io::Read;
        // `len <= limit`: the caller agreed to hold that much.
        let mut buf = Vec::with_capacity(self.len as usize);
        let limit = self.limit;
        self.file
            .take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(UntrustedError::Read)?;
        if buf.len() as u64 > limit {
            return Err(UntrustedError::TooLarge {
                len: buf.len() as u64,
                limit,
            });
        }
        Ok(buf)
    }
}

/// Opens `path` for reading as a file of a directory another process can
/// write: with [`UNTRUSTED_READ_FLAGS`], then [`check_untrusted`]. The one
/// way the library opens trace cache entries and snapshot files (the store's
/// file-system backend resolves its paths beneath its root with the same
/// flags, then calls [`check_untrusted`]).
pub(crate) fn open_untrusted(
    path: &std::path::Path,
    limit: u64,
) -> Result<UntrustedFile, UntrustedError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        // `read(true)` supplies O_RDONLY; the rest of the flags here.
        .custom_flags(UNTRUSTED_READ_FLAGS & !libc::O_ACCMODE)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => UntrustedError::Symlink,
            _ => UntrustedError::Open(e),
        })?;
    check_untrusted(file, limit)
}

/// Checks a file opened with [`UNTRUSTED_READ_FLAGS`]: a regular file by
/// `fstat`, at most `limit` bytes long. Reads nothing.
pub(crate) fn check_untrusted(file: File, limit: u64) -> Result<UntrustedFile, UntrustedError> {
    let meta = file.metadata().map_err(UntrustedError::Stat)?;
    if !meta.is_file() {
        return Err(UntrustedError::NotAFile);
    }
    let len = meta.len();
    if len > limit {
        return Err(UntrustedError::TooLarge { len, limit });
    }
    Ok(UntrustedFile { file, len, limit })
}
