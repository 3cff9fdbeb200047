//! [`ProfileScope`]: where a VM's guest profiles are kept, and for whom.

use std::fmt;
use std::sync::Arc;

use super::cache::{CodeId, TraceCache, TraceKey, TraceKind};

/// The runtime version profiles are recorded under unless the embedder
/// names one ([`ProfileScope::runtime`]).
pub const DEFAULT_RUNTIME: &str = concat!("snapvm ", env!("CARGO_PKG_VERSION"));

/// Where the guest profiles of a VM are kept, and for whom: a
/// [`TraceCache`], the tenant the VM runs for, and the runtime version.
/// Give it to [`VmConfig::profiles`](crate::VmConfig::profiles) (or
/// [`VmInstance::set_profiles`](crate::VmInstance::set_profiles) for a VM
/// restored for a given tenant).
///
/// A blob a guest exports (`snapvm_guest::trace::export`) is stored under
/// the key (tenant, code identity, runtime, `Profile { function }`), where
/// the code identity is [`CodeId::booted`] of the guest program for a VM
/// booted with [`VmInstance::new`](crate::VmInstance::new) and
/// [`CodeId::of`] the program and snapshot for a restored VM, and
/// `function` is the function running (`(init)` during init). An import
/// (`snapvm_guest::trace::import`) returns the newest blob under the same
/// key — so a blob never reaches another tenant, another program, another
/// snapshot or another runtime version.
///
/// ```
/// use std::sync::Arc;
/// use snapvm::trace::{ProfileScope, TraceCache};
///
/// let cache = Arc::new(TraceCache::in_memory(64 << 20));
/// let scope = ProfileScope::new(Arc::clone(&cache), "tenant-42").runtime("executor 3.1");
/// assert_eq!(scope.tenant(), "tenant-42");
/// // let config = VmConfig::new(program).profiles(scope);
/// ```
#[derive(Clone)]
pub struct ProfileScope {
    cache: Arc<TraceCache>,
    tenant: String,
    runtime: String,
}

impl fmt::Debug for ProfileScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProfileScope")
            .field("tenant", &self.tenant)
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

impl ProfileScope {
    /// Profiles of `tenant`, kept in `cache`, under runtime version
    /// [`DEFAULT_RUNTIME`].
    pub fn new(cache: Arc<TraceCache>, tenant: impl Into<String>) -> Self {
        Self {
            cache,
            tenant: tenant.into(),
            runtime: DEFAULT_RUNTIME.into(),
        }
    }

    /// Names the runtime version (for example the executor's or the guest
    /// runtime's version): a new version sees none of the older one's
    /// profiles.
    pub fn runtime(mut self, version: impl Into<String>) -> Self {
        self.runtime = version.into();
        self
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<TraceCache> {
        &self.cache
    }

    /// The tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The runtime version.
    pub fn runtime_version(&self) -> &str {
        &self.runtime
    }

    /// The key of `function`'s profile for code `code`.
    pub fn key(&self, code: CodeId, function: &str) -> TraceKey {
        TraceKey {
            tenant: self.tenant.clone(),
            code,
            runtime: self.runtime.clone(),
            kind: TraceKind::Profile {
                function: function.into(),
            },
        }
    }
}
