//! Errors of the `snapshot` module.

use std::path::PathBuf;

use super::SnapshotId;
use crate::vm::VmError;

/// Why a snapshot could not be taken, saved, loaded or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The VM failed (creating the restored VM, or reading its state).
    #[error(transparent)]
    Vm(VmError),
    /// The store failed (saving to or loading from a `ConvergentStore`, or
    /// filling the memory of a VM restored straight from one). `block`
    /// names the block when one block was at fault: it failed verification
    /// (id or AES-GCM tag), was missing, or did not arrive in time.
    #[error("{}{source}", block.map(|b| format!("store block {b}: ")).unwrap_or_default())]
    Store {
        /// The block at fault, if the failure was one block's.
        block: Option<crate::store::BlockId>,
        /// The store's error (boxed: store errors are large).
        #[source]
        source: Box<crate::store::StoreError>,
    },
    /// Only a ready VM can be captured: a poisoned one stopped mid-call.
    #[error("the VM is poisoned and cannot be captured")]
    NotReady,
    /// Reading or writing a snapshot file (or its in-memory image) failed.
    #[error("{step} failed{}", path.as_ref().map(|p| format!(" for {}", p.display())).unwrap_or_default())]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file, when there is one.
        path: Option<PathBuf>,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Snapshot files must be regular files, not symbolic links.
    #[error("{path} is a symbolic link; snapshot files must be regular files")]
    Symlink {
        /// The path given.
        path: PathBuf,
    },
    /// The file does not start with the snapshot magic.
    #[error("not a snapvm snapshot (bad magic)")]
    BadMagic,
    /// The file uses a format version this build cannot read.
    #[error(
        "snapshot format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A section ends past the end of the file or of its parent section.
    #[error("snapshot {section} is truncated: needs {needed} bytes, {available} available")]
    Truncated {
        /// Which section.
        section: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A section's checksum does not match its contents.
    #[error("snapshot {section} checksum mismatch: the file is corrupt")]
    ChecksumMismatch {
        /// Which section.
        section: &'static str,
    },
    /// A memory block's checksum does not match (corrupt memory image).
    #[error("snapshot memory block {block} is corrupt (checksum mismatch)")]
    CorruptMemory {
        /// Index of the 2 MiB block.
        block: u64,
    },
    /// A field holds a value that cannot be right.
    #[error("malformed snapshot {section}: {reason}")]
    Malformed {
        /// Which section.
        section: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The snapshot's memory is larger than allowed.
    #[error("snapshot memory of {snapshot} bytes exceeds the limit of {limit} bytes")]
    MemoryTooLarge {
        /// Size in the snapshot.
        snapshot: u64,
        /// The limit (the config's memory size, or the loader's maximum).
        limit: u64,
    },
    /// The config's memory size differs from the snapshot's.
    #[error("snapshot memory is {snapshot} bytes but the config asks for {config}")]
    MemorySizeMismatch {
        /// Size in the snapshot.
        snapshot: u64,
        /// Size in the config.
        config: u64,
    },
    /// The config's guest program is not the program the snapshot was taken from.
    #[error("the config's guest program differs from the one the snapshot was taken from")]
    ProgramMismatch,
    /// This host's CPU (as KVM exposes it) lacks features the snapshot's
    /// guest may use.
    #[error("this host cannot run the snapshot: CPUID leaf {leaf:#x}.{index} {register} lacks bits {missing:#010x}")]
    CpuMismatch {
        /// CPUID leaf.
        leaf: u32,
        /// CPUID sub-leaf.
        index: u32,
        /// `eax`, `ebx`, `ecx` or `edx`.
        register: &'static str,
        /// Feature bits the snapshot has and this host lacks.
        missing: u32,
    },
    /// The snapshot was taken on a CPU of another vendor (Intel and AMD):
    /// a guest that booted on one is never moved to the other, because the
    /// same instructions and MSRs behave differently there.
    #[error(
        "this host cannot run the snapshot: it was taken on a {snapshot} CPU, this host is {host}"
    )]
    CpuVendorMismatch {
        /// The vendor string (CPUID leaf 0) the snapshot's guest saw.
        snapshot: String,
        /// This host's vendor string.
        host: String,
    },
    /// A diff snapshot was applied to a base it was not taken against.
    #[error("diff snapshot expects base {expected}, got {found}")]
    WrongBase {
        /// The base the diff was taken against.
        expected: SnapshotId,
        /// The base given.
        found: SnapshotId,
    },
    /// A diff snapshot file was loaded without its base.
    #[error("snapshot is a diff against {base}; load it with Snapshot::load_diff")]
    BaseRequired {
        /// The base it needs.
        base: SnapshotId,
    },
    /// A diff was requested from a VM that does not track dirty pages
    /// against that base.
    #[error("the VM does not track dirty pages against snapshot {base}: enable VmConfig::dirty_tracking and take the base from (or restore from) this VM")]
    NotTracking {
        /// The base asked for.
        base: SnapshotId,
    },
    /// The snapshot file changed after it was loaded.
    #[error("snapshot file {path} changed after it was loaded")]
    FileChanged {
        /// The file.
        path: PathBuf,
    },
}

impl SnapshotError {
    pub(crate) fn io(
        step: &'static str,
        path: Option<&std::path::Path>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.map(ToOwned::to_owned);
        move |source| Self::Io { step, path, source }
    }
}

impl SnapshotError {
    /// What kind of failure this is (see [`crate::ErrorKind`]): the VM
    /// error's kind for a VM failure, [`crate::ErrorKind::Invalid`] for a
    /// snapshot that is malformed, corrupt or does not fit,
    /// [`crate::ErrorKind::Host`] for I/O.
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            Self::Vm(e) => e.kind(),
            Self::Store { source, .. } => source.kind(),
            Self::Io { .. } => K::Host,
            Self::NotReady => K::Poisoned,
            Self::Symlink { .. }
            | Self::BadMagic
            | Self::UnsupportedVersion { .. }
            | Self::Truncated { .. }
            | Self::ChecksumMismatch { .. }
            | Self::CorruptMemory { .. }
            | Self::Malformed { .. }
            | Self::MemoryTooLarge { .. }
            | Self::MemorySizeMismatch { .. }
            | Self::ProgramMismatch
            | Self::CpuMismatch { .. }
            | Self::CpuVendorMismatch { .. }
            | Self::WrongBase { .. }
            | Self::BaseRequired { .. }
            | Self::NotTracking { .. }
            | Self::FileChanged { .. } => K::Invalid,
        }
    }

    /// The VM error inside, if this is a VM failure.
    pub fn vm_error(&self) -> Option<&VmError> {
        match self {
            Self::Vm(e) => Some(e),
            _ => None,
        }
    }
}

impl From<crate::vm::cpu::CpuMismatch> for SnapshotError {
    fn from(m: crate::vm::cpu::CpuMismatch) -> Self {
        use crate::vm::cpu::CpuMismatch as M;
        match m {
            M::Feature {
                leaf,
                index,
                register,
                missing,
            } => SnapshotError::CpuMismatch {
                leaf,
                index,
                register,
                missing,
            },
            M::Vendor { snapshot, host } => SnapshotError::CpuVendorMismatch {
                snapshot: String::from_utf8_lossy(&snapshot).into_owned(),
                host: String::from_utf8_lossy(&host).into_owned(),
            },
        }
    }
}

impl From<crate::store::StoreError> for SnapshotError {
    fn from(source: crate::store::StoreError) -> Self {
        SnapshotError::Store {
            block: None,
            source: Box::new(source),
        }
    }
}

/// A VM error, except that saved state the VM rejected is reported as what
/// it is: a malformed snapshot.
impl From<VmError> for SnapshotError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::InvalidGuestState { reason } => SnapshotError::Malformed {
                section: "guest state",
                reason,
            },
            VmError::InvalidVcpuState { reason } => SnapshotError::Malformed {
                section: "cpu",
                reason,
            },
            other => SnapshotError::Vm(other),
        }
    }
}
