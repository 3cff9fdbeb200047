//! Guest functions resolved once by name ([`Func`]), and the identity of
//! the function table they were resolved from ([`TableId`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Identifies the contents of a function table: every table a VM reads
/// from its guest (at boot) or a snapshot reads from a file gets a new
/// one, and the identity travels with the table through snapshots and
/// restores. Two tables with one identity are equal; equal tables may have
/// different identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TableId(u64);

impl TableId {
    /// The table of a VM whose guest has not reported ready yet (no
    /// functions: nothing resolves against it).
    pub(crate) const EMPTY: Self = Self(0);

    /// An identity no table had before in this process.
    pub(crate) fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A guest function resolved by name, for calls that skip the name lookup
/// (like Wasmtime's `Func`). Resolve it once with [`VmInstance::func`](crate::VmInstance::func),
/// [`Snapshot::func`](crate::Snapshot::func) or [`Invoke::func`](crate::Invoke::func), then call it on that VM or any
/// other with [`Func::invoke`] or [`Invoke::invoke_func`](crate::Invoke::invoke_func).
///
/// A handle is valid on every VM: on a VM whose function table is the one
/// the handle was resolved from (the same VM, the VMs restored from its
/// snapshots, those of a [`ReadyPool`](crate::ReadyPool) of such a
/// snapshot) the call goes by the remembered index; on any other VM — one
/// restored from a snapshot of another program, or of the same program
/// with another table — it goes by name, exactly like
/// [`Invoke::invoke`](crate::Invoke::invoke): the function of that name, or
/// [`VmError::UnknownFunction`](super::VmError::UnknownFunction). It never calls another function.
///
/// ```no_run
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("quickstart.elf")?);
/// let mut vm = VmInstance::new(&config)?;
/// let reverse = vm.func("reverse")?;
/// assert_eq!(reverse.invoke(&mut vm, b"hello")?, b"olleh");
/// # Ok(()) }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Func {
    name: Box<str>,
    index: u64,
    table: TableId,
}

impl fmt::Debug for Func {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Func")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Func {
    /// The handle of function `name`, index `index` of table `table`.
    pub(crate) fn new(name: &str, index: u64, table: TableId) -> Self {
        Self {
            name: name.into(),
            index,
            table,
        }
    }

    /// The function's name.
    ///
    /// ```no_run
    /// # fn f(vm: &snapvm::VmInstance) -> Result<(), snapvm::VmError> {
    /// assert_eq!(vm.func("reverse")?.name(), "reverse");
    /// # Ok(()) }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The function's index, if `table` is the table it was resolved from.
    pub(crate) fn index_in(&self, table: TableId) -> Option<u64> {
        (self.table == table).then_some(self.index)
    }
}
