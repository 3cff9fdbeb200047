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
//! in `tmp/`, which [`Backend::remove_incomplete`] clears. Symbolic links are
//! never followed: an object, shard directory or namespace directory that is
//! a symlink is an error.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::{Backend, Namespace, ObjectName, PutOutcome};
use crate::store::error::BackendError;

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
    tmp: PathBuf,
    durability: Durability,
    /// Shard directories known to exist, indexed by namespace * 256 + shard.
    shards: Box<[AtomicBool]>,
    /// Shard directories with renames not yet made durable (see `flush`),
    /// indexed like `shards`.
    unsynced: Box<[AtomicBool]>,
    counter: AtomicU64,
}

fn ns_index(ns: Namespace) -> usize {
    match ns {
        Namespace::Blocks => 0,
        Namespace::Manifests => 1,
        Namespace::Leases => 2,
        Namespace::Sweeps => 3,
    }
}

/// Creates `path` as a directory if missing; fails if it is a symlink or not
/// a directory. Returns whether it was created.
fn ensure_dir(path: &Path) -> Result<bool, BackendError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(BackendError::Symlink { path: path.into() }),
        Ok(m) if !m.is_dir() => Err(BackendError::NotADirectory { path: path.into() }),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::create_dir(path) {
            Ok(()) => Ok(true),
            // Another writer created it first: check what it is.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => ensure_dir(path).map(|_| false),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

fn map_open_err(e: io::Error, path: &Path) -> BackendError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        BackendError::Symlink { path: path.into() }
    } else {
        e.into()
    }
}

/// Whether `file` is a regular file holding exactly `bytes`. Reads at most
/// `bytes.len()` bytes (the length is checked first).
fn same_contents(file: File, bytes: &[u8]) -> io::Result<bool> {
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() != bytes.len() as u64 {
        return Ok(false);
    }
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
        let mut created = false;
        for ns in Namespace::ALL {
            created |= ensure_dir(&root.join(ns.as_str()))?;
        }
        let tmp = root.join("tmp");
        created |= ensure_dir(&tmp)?;
        if created && durability == Durability::Fsync {
            sync_dir(&root)?;
        }
        Ok(Self {
            root,
            tmp,
            durability,
            shards: (0..4 * 256).map(|_| AtomicBool::new(false)).collect(),
            unsynced: (0..4 * 256).map(|_| AtomicBool::new(false)).collect(),
            counter: AtomicU64::new(0),
        })
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

    fn ensure_shard(&self, name: &ObjectName, dir: &Path) -> Result<(), BackendError> {
        let slot = &self.shards[ns_index(name.namespace) * 256 + name.id[0] as usize];
        if !slot.load(Ordering::Relaxed) {
            if ensure_dir(dir)? && self.durability == Durability::Fsync {
                sync_dir(dir.parent().unwrap_or(&self.root))?;
            }
            slot.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn write_tmp(&self, hex: &str, bytes: &[u8]) -> Result<PathBuf, BackendError> {
        loop {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let path = self
                .tmp
                .join(format!("{hex}.{}.{n}.tmp", std::process::id()));
            let mut f = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(map_open_err(e, &path)),
            };
            let written = f.write_all(bytes).and_then(|()| {
                if self.durability == Durability::Fsync {
                    f.sync_data()
                } else {
                    Ok(())
                }
            });
            return match written {
                Ok(()) => Ok(path),
                Err(e) => {
                    drop(f);
                    let _ = fs::remove_file(&path);
                    Err(e.into())
                }
            };
        }
    }
}

impl Backend for FsBackend {
    fn put_if_absent(&self, name: &ObjectName, bytes: &[u8]) -> Result<PutOutcome, BackendError> {
        let hex = name.hex();
        let dir = self.root.join(name.namespace.as_str()).join(&hex[..2]);
        let path = dir.join(&hex);
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            // Trust an existing object only if it holds exactly these bytes
            // (the name is their hash, or random for markers); a truncated or
            // damaged one is replaced below, so putting the data again heals it.
            Ok(f) => {
                if same_contents(f, bytes)? {
                    return Ok(PutOutcome::AlreadyPresent);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(map_open_err(e, &path)),
        }
        self.ensure_shard(name, &dir)?;
        let tmp = self.write_tmp(&hex, bytes)?;
        // rename replaces a file that a concurrent writer put there first;
        // names are content addresses, so its bytes were identical.
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
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
                let dir = self.root.join(ns.as_str()).join(format!("{:02x}", i % 256));
                if let Err(e) = sync_dir(&dir) {
                    pending.store(true, Ordering::Release);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    fn get(&self, name: &ObjectName, limit: u64) -> Result<Option<Vec<u8>>, BackendError> {
        let path = self.path_of(name);
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(map_open_err(e, &path)),
        };
        let len = f.metadata()?.len();
        if len > limit {
            return Err(BackendError::TooLarge { len, limit });
        }
        // `len <= limit`, and the limit is what the caller agreed to hold.
        let mut buf = Vec::with_capacity(len as usize);
        f.take(limit + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > limit {
            return Err(BackendError::TooLarge {
                len: buf.len() as u64,
                limit,
            });
        }
        Ok(Some(buf))
    }

    fn has(&self, name: &ObjectName) -> Result<bool, BackendError> {
        let path = self.path_of(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => Err(BackendError::Symlink { path }),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn delete(&self, name: &ObjectName) -> Result<(), BackendError> {
        match fs::remove_file(self.path_of(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self, namespace: Namespace) -> Result<Vec<ObjectName>, BackendError> {
        let ns_dir = self.root.join(namespace.as_str());
        let mut out = Vec::new();
        for shard in fs::read_dir(&ns_dir)? {
            let shard = shard?;
            let ft = shard.file_type()?;
            if ft.is_symlink() {
                return Err(BackendError::Symlink { path: shard.path() });
            }
            let shard_name = shard.file_name();
            let Some(prefix) = shard_name.to_str().filter(|s| s.len() == 2 && ft.is_dir()) else {
                continue;
            };
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                if entry.file_type()?.is_symlink() {
                    return Err(BackendError::Symlink { path: entry.path() });
                }
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

    fn remove_incomplete(&self, older_than: Duration) -> Result<u64, BackendError> {
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            let modified = entry.metadata()?.modified()?;
            let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
            if age >= older_than {
                match fs::remove_file(entry.path()) {
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
        assert!(matches!(
            be.list(Namespace::Blocks),
            Err(BackendError::Symlink { .. })
        ));

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
