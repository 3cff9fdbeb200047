//! The file-system backend: one file per object, written atomically.
//!
//! Layout under the root (see `docs/store-format.md`):
//!
//! ```text
//! <root>/blocks/<hh>/<64 hex>      hh = first two hex digits of the id
//! <root>/manifests/<hh>/<64 hex>
//! <root>/leases/<hh>/<64 hex>
//! <root>/sweeps/<hh>/<64 hex>
//! <root>/tmp/                      writes in progress
//! ```
//!
//! A write goes to a new file in `tmp/`, is fsynced and renamed into place;
//! the destination directories are fsynced in [`Backend::flush`], which the
//! store calls before and after writing a manifest. A reader therefore sees a whole
//! object or none, also after a crash; a killed writer leaves at most a file
//! in `tmp/`, which [`Backend::remove_incomplete`] clears.
//!
//! Symbolic links are never followed below the root: every object, shard
//! directory and namespace directory is reached from a descriptor of the
//! root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or, where the
//! kernel lacks it (before Linux 5.6, or a seccomp filter refusing it), by
//! opening one component at a time with `O_NOFOLLOW`. A symlink on the way
//! is [`BackendError::Symlink`]; renames and deletes work on the descriptor
//! of the verified shard directory, so neither can touch a file outside the
//! store. The root itself must not be a symlink when the store is opened
//! (its ancestors may be).

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::{Backend, Listing, Namespace, ObjectName, PutOutcome};
use crate::store::error::BackendError;
use crate::sys::fs::{
    check_untrusted, file_type_at, mkdirat, openat, openat2_beneath, renameat, unlinkat,
    UntrustedError, UntrustedFile, UNTRUSTED_READ_FLAGS,
};

/// How hard [`FsBackend`] works to make a write survive power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// fsync each new file before renaming it into place, and its directory
    /// in `flush`: a put that returned survives power loss. The default.
    #[default]
    Fsync,
    /// No fsync. Writes are still atomic with respect to process crashes
    /// (SIGKILL), but after power loss recent objects may be missing. For
    /// caches and tmpfs.
    Process,
}

/// A [`Backend`] storing each object as a file under a root directory.
#[derive(Debug)]
pub struct FsBackend {
    root: PathBuf,
    /// The root directory, opened without following a symlink.
    root_fd: OwnedFd,
    /// `<root>/tmp`, opened beneath the root.
    tmp_fd: OwnedFd,
    durability: Durability,
    /// Shard directories with renames not yet made durable (see `flush`),
    /// indexed by namespace * 256 + shard.
    unsynced: Box<[AtomicBool]>,
    /// Whether `openat2` may be tried (cleared when the kernel refuses it).
    openat2: AtomicBool,
    counter: AtomicU64,
    /// This process's id, for the names of temporary files, read once (a
    /// `getpid` per object was a tenth of a block put's system calls). A
    /// forked child that keeps using the backend may pick a name its parent
    /// holds; `O_EXCL` refuses it and the next is tried.
    pid: u32,
}

fn ns_index(ns: Namespace) -> usize {
    match ns {
        Namespace::Blocks => 0,
        Namespace::Manifests => 1,
        Namespace::Leases => 2,
        Namespace::Sweeps => 3,
    }
}

// The `*at` system calls are `sys::fs`'s thin wrappers.

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Whether `file` (a checked regular file) holds exactly `bytes`. Reads at
/// most `bytes.len()` bytes (the length is checked first).
fn same_contents(file: UntrustedFile, bytes: &[u8]) -> io::Result<bool> {
    if file.len != bytes.len() as u64 {
        return Ok(false);
    }
    let file = file.file;
    let mut chunk = [0u8; 16 * 1024];
    let mut rest = bytes;
    let mut file = file.take(bytes.len() as u64);
    while !rest.is_empty() {
        let want = rest.len().min(chunk.len());
        match file.read(&mut chunk[..want]) {
            Ok(0) => return Ok(false), // shrank meanwhile
            Ok(n) => {
                if chunk[..n] != rest[..n] {
                    return Ok(false);
                }
                rest = &rest[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn is_not_found(e: &BackendError) -> bool {
    matches!(e, BackendError::Io(e) if e.kind() == io::ErrorKind::NotFound)
}

impl FsBackend {
    /// Opens the store under `root`, creating the directories it needs.
    /// Fails if `root` or one of its namespace directories is a symlink.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, BackendError> {
        Self::open_with(root, Durability::Fsync)
    }

    /// Like [`FsBackend::open`] with an explicit [`Durability`].
    pub fn open_with(root: impl AsRef<Path>, durability: Durability) -> Result<Self, BackendError> {
        let root = root.as_ref().to_path_buf();
        match fs::symlink_metadata(&root) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(BackendError::Symlink { path: root })
            }
            Ok(m) if !m.is_dir() => return Err(BackendError::NotADirectory { path: root }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(&root)?,
            Err(e) => return Err(e.into()),
        }
        let root_fd: OwnedFd = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&root)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => BackendError::Symlink { path: root.clone() },
                Some(libc::ENOTDIR) => BackendError::NotADirectory { path: root.clone() },
                _ => e.into(),
            })?
            .into();
        let mut created = false;
        for dir in Namespace::ALL
            .map(Namespace::as_str)
            .into_iter()
            .chain(["tmp"])
        {
            created |= mkdirat(root_fd.as_fd(), &c_name(dir)?)?;
        }
        if created && durability == Durability::Fsync {
            File::from(root_fd.try_clone()?).sync_all()?;
        }
        let mut backend = Self {
            root,
            tmp_fd: root_fd.try_clone()?,
            root_fd,
            durability,
            unsynced: (0..4 * 256).map(|_| AtomicBool::new(false)).collect(),
            openat2: AtomicBool::new(true),
            counter: AtomicU64::new(0),
            pid: std::process::id(),
        };
        for ns in Namespace::ALL {
            backend.open_beneath(ns.as_str(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        }
        backend.tmp_fd = backend.open_beneath("tmp", libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(backend)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds (or would hold) object `name`.
    pub fn path_of(&self, name: &ObjectName) -> PathBuf {
        let hex = name.hex();
        self.root
            .join(name.namespace.as_str())
            .join(&hex[..2])
            .join(&hex)
    }

    /// Opens `rel` (components separated by `/`) beneath the root with
    /// `flags`, following no symlink on the way. A missing component is an
    /// `Io` error of kind `NotFound`.
    fn open_beneath(&self, rel: &str, flags: libc::c_int) -> Result<OwnedFd, BackendError> {
        if self.openat2.load(Ordering::Relaxed) {
            match openat2_beneath(self.root_fd.as_fd(), &c_name(rel)?, flags) {
                Ok(fd) => return Ok(fd),
                // No openat2 here (old kernel, seccomp): walk instead.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    self.openat2.store(false, Ordering::Relaxed);
                }
                // Redo it one component at a time to name the culprit.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.walk_beneath(rel, flags)
    }

    /// [`FsBackend::open_beneath`] one component at a time, each opened
    /// with `O_NOFOLLOW` relative to the previous one.
    fn walk_beneath(&self, rel: &str, flags: libc::c_int) -> Result<OwnedFd, BackendError> {
        let mut parts = rel.split('/').peekable();
        let mut dir: Option<OwnedFd> = None;
        let mut path = self.root.clone();
        while let Some(part) = parts.next() {
            path.push(part);
            let last = parts.peek().is_none();
            let at = dir.as_ref().map_or(self.root_fd.as_fd(), |d| d.as_fd());
            let name = c_name(part)?;
            let f = if last {
                flags | libc::O_NOFOLLOW
            } else {
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW
            };
            match openat(at, &name, f, 0) {
                Ok(fd) => dir = Some(fd),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    return Err(match file_type_at(at, &name) {
                        Ok(libc::S_IFLNK) => BackendError::Symlink { path },
                        Ok(_) => BackendError::NotADirectory { path },
                        Err(_) => e.into(),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        dir.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput).into())
    }

    /// The shard directory of `name`, created if `create` and missing;
    /// `None` if missing and not `create`.
    fn shard_dir(&self, name: &ObjectName, create: bool) -> Result<Option<OwnedFd>, BackendError> {
        let ns = name.namespace.as_str();
        let shard = format!("{:02x}", name.id[0]);
        let rel = format!("{ns}/{shard}");
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        match self.open_beneath(&rel, flags) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if is_not_found(&e) && create => {
                let ns_fd = self.open_beneath(ns, flags)?;
                if mkdirat(ns_fd.as_fd(), &c_name(&shard)?)? && self.durability == Durability::Fsync
                {
                    File::from(ns_fd).sync_all()?;
                }
                self.open_beneath(&rel, flags).map(Some)
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The backend error for a refused object file.
    fn untrusted_error(&self, name: &ObjectName, e: UntrustedError) -> BackendError {
        match e {
            UntrustedError::Open(e) | UntrustedError::Stat(e) | UntrustedError::Read(e) => e.into(),
            UntrustedError::Symlink => BackendError::Symlink {
                path: self.path_of(name),
            },
            UntrustedError::NotAFile => BackendError::NotAFile {
                path: self.path_of(name),
            },
            UntrustedError::TooLarge { len, limit } => BackendError::TooLarge { len, limit },
        }
    }

    /// Lists `namespace`. A namespace or shard directory that is a symlink
    /// (or, for a shard name, not a directory) fails the listing with
    /// `skipped` `None`, and is recorded there and left out otherwise.
    fn list_inner(
        &self,
        namespace: Namespace,
        mut skipped: Option<&mut Vec<PathBuf>>,
    ) -> Result<Vec<ObjectName>, BackendError> {
        // Fails if the namespace directory is a symlink.
        match self.open_beneath(namespace.as_str(), libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(_) => {}
            Err(BackendError::Symlink { path } | BackendError::NotADirectory { path })
                if skipped.is_some() =>
            {
                if let Some(s) = skipped {
                    s.push(path);
                }
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        }
        let ns_dir = self.root.join(namespace.as_str());
        let mut out = Vec::new();
        for shard in fs::read_dir(&ns_dir)? {
            let shard = shard?;
            let ft = shard.file_type()?;
            let shard_name = shard.file_name();
            let is_shard_name = shard_name.to_str().is_some_and(|s| {
                s.len() == 2 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
            });
            if ft.is_symlink() || (is_shard_name && !ft.is_dir()) {
                match skipped.as_deref_mut() {
                    Some(s) => {
                        s.push(shard.path());
                        continue;
                    }
                    None if ft.is_symlink() => {
                        return Err(BackendError::Symlink { path: shard.path() })
                    }
                    None => continue,
                }
            }
            let Some(prefix) = shard_name.to_str().filter(|s| s.len() == 2 && ft.is_dir()) else {
                continue;
            };
            // Entries of any type are listed: reading or deleting one that
            // is not a regular file is a typed error (Symlink, NotAFile),
            // which `verify` reports as a problem.
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let file_name = entry.file_name();
                let Some(hex) = file_name.to_str() else {
                    continue;
                };
                if let Some(name) = ObjectName::parse(namespace, hex) {
                    if hex.starts_with(prefix) {
                        out.push(name);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes `bytes` to a new file in `tmp/`; returns its name there.
    fn write_tmp(&self, hex: &str, bytes: &[u8]) -> Result<CString, BackendError> {
        loop {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let name = c_name(&format!("{hex}.{}.{n}.tmp", self.pid))?;
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
            let mut f = match openat(self.tmp_fd.as_fd(), &name, flags, 0o666) {
                Ok(fd) => File::from(fd),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            };
            let written = f.write_all(bytes).and_then(|()| {
                if self.durability == Durability::Fsync {
                    f.sync_data()
                } else {
                    Ok(())
                }
            });
            return match written {
                Ok(()) => Ok(name),
                Err(e) => {
                    drop(f);
                    let _ = unlinkat(self.tmp_fd.as_fd(), &name);
                    Err(e.into())
                }
            };
        }
    }
}

impl Backend for FsBackend {
    fn put_if_absent(&self, name: &ObjectName, bytes: &[u8]) -> Result<PutOutcome, BackendError> {
        let hex = name.hex();
        let file = c_name(&hex)?;
        let dir = self
            .shard_dir(name, true)?
            .ok_or_else(|| BackendError::from(io::Error::from(io::ErrorKind::NotFound)))?;
        match openat(dir.as_fd(), &file, UNTRUSTED_READ_FLAGS, 0) {
            // Trust an existing object only if it holds exactly these bytes
            // (the name is their hash, or random for markers); a truncated or
            // damaged one is replaced below, so putting the data again heals it.
            Ok(fd) => {
                let f = check_untrusted(File::from(fd), u64::MAX)
                    .map_err(|e| self.untrusted_error(name, e))?;
                if same_contents(f, bytes)? {
                    return Ok(PutOutcome::AlreadyPresent);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(BackendError::Symlink {
                    path: self.path_of(name),
                })
            }
            Err(e) => return Err(e.into()),
        }
        let tmp = self.write_tmp(&hex, bytes)?;
        // rename replaces a file that a concurrent writer put there first;
        // names are content addresses, so its bytes were identical (or it
        // was damaged, see above).
        if let Err(e) = renameat(self.tmp_fd.as_fd(), &tmp, dir.as_fd(), &file) {
            let _ = unlinkat(self.tmp_fd.as_fd(), &tmp);
            return Err(e.into());
        }
        if self.durability == Durability::Fsync {
            // The file's data is synced; the rename becomes durable when
            // its directory is synced, once per directory in `flush`.
            self.unsynced[ns_index(name.namespace) * 256 + name.id[0] as usize]
                .store(true, Ordering::Release);
        }
        Ok(PutOutcome::Stored)
    }

    fn flush(&self) -> Result<(), BackendError> {
        for (i, pending) in self.unsynced.iter().enumerate() {
            if pending.swap(false, Ordering::AcqRel) {
                let ns = Namespace::ALL[i / 256];
                let rel = format!("{}/{:02x}", ns.as_str(), i % 256);
                let synced = self
                    .open_beneath(&rel, libc::O_RDONLY | libc::O_DIRECTORY)
                    .and_then(|fd| File::from(fd).sync_all().map_err(BackendError::from));
                if let Err(e) = synced {
                    pending.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn get(&self, name: &ObjectName, limit: u64) -> Result<Option<Vec<u8>>, BackendError> {
        let hex = name.hex();
        let rel = format!("{}/{}/{hex}", name.namespace.as_str(), &hex[..2]);
        let f = match self.open_beneath(&rel, UNTRUSTED_READ_FLAGS) {
            Ok(fd) => File::from(fd),
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        check_untrusted(f, limit)
            .and_then(UntrustedFile::read_all)
            .map(Some)
            .map_err(|e| self.untrusted_error(name, e))
    }

    fn has(&self, name: &ObjectName) -> Result<bool, BackendError> {
        let Some(dir) = self.shard_dir(name, false)? else {
            return Ok(false);
        };
        match file_type_at(dir.as_fd(), &c_name(&name.hex())?) {
            Ok(libc::S_IFLNK) => Err(BackendError::Symlink {
                path: self.path_of(name),
            }),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn delete(&self, name: &ObjectName) -> Result<(), BackendError> {
        let Some(dir) = self.shard_dir(name, false)? else {
            return Ok(());
        };
        match unlinkat(dir.as_fd(), &c_name(&name.hex())?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => Err(BackendError::NotAFile {
                path: self.path_of(name),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self, namespace: Namespace) -> Result<Vec<ObjectName>, BackendError> {
        self.list_inner(namespace, None)
    }

    fn list_skipping(&self, namespace: Namespace) -> Result<Listing, BackendError> {
        let mut skipped = Vec::new();
        let objects = self.list_inner(namespace, Some(&mut skipped))?;
        Ok(Listing::new(objects, skipped))
    }

    fn remove_incomplete(&self, older_than: Duration) -> Result<u64, BackendError> {
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let entry = entry?;
            let name = CString::new(entry.file_name().as_bytes())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // Examine and remove it through the verified tmp descriptor.
            let modified = match openat(self.tmp_fd.as_fd(), &name, UNTRUSTED_READ_FLAGS, 0) {
                Ok(fd) => File::from(fd).metadata()?.modified()?,
                // Gone meanwhile, or a symlink (removed below, never followed).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => SystemTime::UNIX_EPOCH,
                Err(e) => return Err(e.into()),
            };
            let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
            if age >= older_than {
                match unlinkat(self.tmp_fd.as_fd(), &name) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(ns: Namespace, b: u8) -> ObjectName {
        ObjectName {
            namespace: ns,
            id: [b; 32],
        }
    }

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let be = FsBackend::open(dir.path().join("s")).unwrap();
        let n = name(Namespace::Blocks, 0xab);
        assert_eq!(be.get(&n, 100).unwrap(), None);
        assert_eq!(be.put_if_absent(&n, b"hello").unwrap(), PutOutcome::Stored);
        assert_eq!(
            be.put_if_absent(&n, b"hello").unwrap(),
            PutOutcome::AlreadyPresent
        );
        assert!(be.has(&n).unwrap());
        let path = dir.path().join("s/blocks/ab").join("ab".repeat(32));
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        assert_eq!(be.get(&n, 5).unwrap().unwrap(), b"hello");
        assert!(matches!(
            be.get(&n, 4),
            Err(BackendError::TooLarge { len: 5, limit: 4 })
        ));
        assert_eq!(be.list(Namespace::Blocks).unwrap(), vec![n]);
        assert!(be.list(Namespace::Manifests).unwrap().is_empty());
        // Stray files are ignored by listings.
        fs::write(dir.path().join("s/blocks/ab/junk"), b"x").unwrap();
        assert_eq!(be.list(Namespace::Blocks).unwrap(), vec![n]);
        be.delete(&n).unwrap();
        be.delete(&n).unwrap();
        assert!(!be.has(&n).unwrap());
        assert_eq!(fs::read_dir(dir.path().join("s/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn rejects_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let be = FsBackend::open(dir.path().join("s")).unwrap();
        let n = name(Namespace::Blocks, 0x01);
        let outside = dir.path().join("outside");
        fs::write(&outside, b"secret").unwrap();
        fs::create_dir_all(dir.path().join("s/blocks/01")).unwrap();
        std::os::unix::fs::symlink(&outside, be.path_of(&n)).unwrap();
        assert!(matches!(be.get(&n, 100), Err(BackendError::Symlink { .. })));
        assert!(matches!(be.has(&n), Err(BackendError::Symlink { .. })));
        assert!(matches!(
            be.put_if_absent(&n, b"x"),
            Err(BackendError::Symlink { .. })
        ));
        // Listed (so verify can report it), never followed.
        assert_eq!(be.list(Namespace::Blocks).unwrap(), vec![n]);
        be.delete(&n).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"secret");

        // A symlinked shard directory.
        let m = name(Namespace::Manifests, 0x02);
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("s/manifests/02")).unwrap();
        assert!(matches!(
            be.put_if_absent(&m, b"x"),
            Err(BackendError::Symlink { .. })
        ));
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
        // ... with a file of the right name behind it.
        let outside_m = elsewhere.join(m.hex());
        fs::write(&outside_m, b"outside").unwrap();
        assert!(matches!(be.get(&m, 100), Err(BackendError::Symlink { .. })));
        assert!(matches!(be.has(&m), Err(BackendError::Symlink { .. })));
        assert!(matches!(be.delete(&m), Err(BackendError::Symlink { .. })));
        assert_eq!(fs::read(&outside_m).unwrap(), b"outside");
        assert!(matches!(
            be.list(Namespace::Manifests),
            Err(BackendError::Symlink { .. })
        ));
        // Both ways of resolving agree.
        be.openat2.store(false, Ordering::Relaxed);
        assert!(matches!(be.get(&m, 100), Err(BackendError::Symlink { .. })));
        assert!(matches!(be.delete(&m), Err(BackendError::Symlink { .. })));
        assert_eq!(fs::read(&outside_m).unwrap(), b"outside");
        be.openat2.store(true, Ordering::Relaxed);

        // A symlinked namespace directory.
        fs::rename(dir.path().join("s/leases"), dir.path().join("leases-moved")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("leases-moved"), dir.path().join("s/leases"))
            .unwrap();
        let l = name(Namespace::Leases, 0x03);
        assert!(matches!(
            be.put_if_absent(&l, b"x"),
            Err(BackendError::Symlink { .. })
        ));
        assert!(matches!(
            be.list(Namespace::Leases),
            Err(BackendError::Symlink { .. })
        ));

        // A symlinked root.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("s"), &link).unwrap();
        assert!(matches!(
            FsBackend::open(&link),
            Err(BackendError::Symlink { .. })
        ));
    }

    #[test]
    fn remove_incomplete_clears_old_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let be = FsBackend::open(dir.path()).unwrap();
        fs::write(dir.path().join("tmp/x.1.0.tmp"), b"partial").unwrap();
        assert_eq!(be.remove_incomplete(Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(be.remove_incomplete(Duration::ZERO).unwrap(), 1);
    }
}
