//! [`VmConfig`]: everything a [`VmInstance`](crate::VmInstance) is built from.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::error::VmError;
use super::loader::GuestProgram;
use crate::abi::{HUGE_PAGE_SIZE, MAX_FUNCTION_NAME};

/// Default guest memory size: 64 MiB.
pub const DEFAULT_MEMORY_SIZE: u64 = 64 << 20;
/// Largest guest memory size: 64 GiB.
pub const MAX_MEMORY_SIZE: u64 = 64 << 30;
/// Smallest guest memory size: 4 MiB.
pub const MIN_MEMORY_SIZE: u64 = 4 << 20;
/// Default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on one call's output.
pub const DEFAULT_MAX_OUTPUT: u64 = 256 << 20;
/// Default limit on the input a guest passes to one host function call.
pub const DEFAULT_MAX_HOST_CALL_INPUT: u64 = 16 << 20;
/// Default limit on the result a host function may hand to the guest.
pub const DEFAULT_MAX_HOST_CALL_OUTPUT: u64 = 16 << 20;
/// Default limit on one guest message: a log line, a panic or abort text.
pub const DEFAULT_MAX_MESSAGE: u64 = 16 << 10;
/// Default budget of guest log bytes per call (and for init).
pub const DEFAULT_LOG_BUDGET: u64 = 256 << 10;
/// Default limit on one guest profile blob (`snapvm_guest::trace`).
pub const DEFAULT_MAX_PROFILE: u64 = 4 << 20;

/// The error type host functions return. Its `Display` text is passed to
/// the guest, which sees `HostError::Failed(message)`.
pub type HostFnError = Box<dyn std::error::Error + Send + Sync>;

/// Which clock a call's timeout ([`VmConfig::timeout`]) runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimeoutClock {
    /// Wall-clock time from the start of the call (host functions
    /// included). The default: it bounds how long a caller waits. On a
    /// loaded host it also counts time the vCPU thread waited for a core,
    /// so a short call can time out without having run long.
    #[default]
    Wall,
    /// CPU time of the thread running the vCPU during the call (guest code,
    /// exits and host functions on that thread). A call times out only
    /// when it has really run that long, however loaded the host; a call
    /// starved of CPU may take longer than the limit in wall-clock time.
    /// Costs one extra system call per call.
    ThreadCpu,
}

impl fmt::Display for TimeoutClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wall => "wall-clock",
            Self::ThreadCpu => "CPU-time",
        })
    }
}

/// A function the host offers to guests: input bytes in, output bytes out.
pub type HostFn = dyn Fn(&[u8]) -> Result<Vec<u8>, HostFnError> + Send + Sync;

/// A host function that also receives the call's context (see
/// [`HostCaller`](super::HostCaller)), with the VM's data of type `D`.
pub type HostFnWithCaller<D = ()> =
    dyn Fn(&mut super::HostCaller<'_, D>, &[u8]) -> Result<Vec<u8>, HostFnError> + Send + Sync;

/// How a VM is built: the guest program, memory size, limits and host
/// functions. Cheap to clone (the program and functions are shared), so one
/// config can build any number of VMs, from any thread.
///
/// ```no_run
/// use std::time::Duration;
/// use snapvm::{GuestProgram, VmConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?)
///     .memory_size(128 << 20)
///     .timeout(Some(Duration::from_millis(500)))
///     .host_function("now", |_input| Ok(b"12:00".to_vec()));
/// # Ok(()) }
/// ```
///
/// # Host data
/// `D` is the type of the data each VM built from this config carries for
/// its host functions (the tenant, a database handle, counters): they see
/// it as [`HostCaller::data`](super::HostCaller::data), typed, with no
/// downcast. It is `()` unless [`VmConfig::data_type`] names another type.
pub struct VmConfig<D = ()> {
    pub(crate) program: GuestProgram,
    pub(crate) memory_size: u64,
    pub(crate) timeout: Option<Duration>,
    pub(crate) timeout_clock: TimeoutClock,
    pub(crate) max_output: u64,
    pub(crate) host_functions: Arc<HashMap<String, Arc<HostFnWithCaller<D>>>>,
    /// Host functions whose calls inside a transaction attempt are
    /// buffered and delivered only if the attempt succeeds.
    pub(crate) deferred: Arc<HashSet<String>>,
    pub(crate) dirty_tracking: bool,
    pub(crate) max_preserved: u64,
    pub(crate) scratch_disk: Option<ScratchDisk>,
    pub(crate) limits: GuestLimits,
    /// The settings of the features plugged into the core (the network
    /// device, guest profiles), set by their own builder methods.
    pub(crate) ext: super::ExtSettings,
}

// Not derived: a derived `Clone` would require `D: Clone`, and the config
// holds no `D`.
impl<D> Clone for VmConfig<D> {
    fn clone(&self) -> Self {
        Self {
            program: self.program.clone(),
            memory_size: self.memory_size,
            timeout: self.timeout,
            timeout_clock: self.timeout_clock,
            max_output: self.max_output,
            host_functions: Arc::clone(&self.host_functions),
            deferred: Arc::clone(&self.deferred),
            dirty_tracking: self.dirty_tracking,
            max_preserved: self.max_preserved,
            scratch_disk: self.scratch_disk.clone(),
            limits: self.limits,
            ext: self.ext.clone(),
        }
    }
}

/// Limits on what the host allocates or copies on a guest's behalf. Each
/// bounds one guest-controlled size, so no guest can make the host allocate
/// or copy more than these per call. Set them with
/// [`VmConfig::host_call_limits`], [`VmConfig::max_message`] and
/// [`VmConfig::log_budget`]; [`VmConfig::max_preserved`] and
/// [`VmConfig::max_output`] bound the other two guest-sized buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GuestLimits {
    /// Host-call input bytes ([`DEFAULT_MAX_HOST_CALL_INPUT`]).
    pub(crate) host_call_input: u64,
    /// Host-call result bytes ([`DEFAULT_MAX_HOST_CALL_OUTPUT`]).
    pub(crate) host_call_output: u64,
    /// One log line, panic or abort message ([`DEFAULT_MAX_MESSAGE`]).
    pub(crate) message: u64,
    /// Log bytes per call ([`DEFAULT_LOG_BUDGET`]).
    pub(crate) log_budget: u64,
    /// One guest profile blob ([`DEFAULT_MAX_PROFILE`]).
    pub(crate) profile: u64,
}

impl Default for GuestLimits {
    fn default() -> Self {
        Self {
            host_call_input: DEFAULT_MAX_HOST_CALL_INPUT,
            host_call_output: DEFAULT_MAX_HOST_CALL_OUTPUT,
            message: DEFAULT_MAX_MESSAGE,
            log_budget: DEFAULT_LOG_BUDGET,
            profile: DEFAULT_MAX_PROFILE,
        }
    }
}

/// Default limit on the bytes a guest may preserve across resets.
pub const DEFAULT_MAX_PRESERVED: u64 = 1 << 20;
/// Largest scratch disk: 4 GiB.
pub const MAX_DISK_SIZE: u64 = 4 << 30;

/// A scratch disk: an image whose contents the guest reads and writes
/// through `snapvm_guest::disk`. The guest works on a private copy held in
/// VM memory (above the heap): writes never reach the image, snapshots
/// include the disk, and a reset returns it to its ready-state contents.
#[derive(Clone)]
pub struct ScratchDisk {
    bytes: Arc<Vec<u8>>,
    size: u64,
}

impl fmt::Debug for ScratchDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScratchDisk")
            .field("size", &self.size)
            .finish()
    }
}

impl ScratchDisk {
    /// Reads a disk image file (at most 4 GiB). The disk's size is the
    /// file's, rounded up to 2 MiB with zeroes.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, VmError> {
        let path = path.as_ref();
        let invalid = |reason: String| VmError::InvalidConfig {
            field: "scratch_disk",
            reason,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?
            .len();
        if len > MAX_DISK_SIZE {
            return Err(invalid(format!(
                "{len} bytes exceeds the {MAX_DISK_SIZE}-byte limit"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        Ok(Self::from_bytes(bytes))
    }

    /// A disk holding `bytes` (rounded up to 2 MiB with zeroes).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let size = (bytes.len() as u64).max(1).next_multiple_of(HUGE_PAGE_SIZE);
        Self {
            bytes: Arc::new(bytes),
            size,
        }
    }

    /// An all-zero disk of `size` bytes (rounded up to 2 MiB).
    pub fn zeroed(size: u64) -> Self {
        Self {
            bytes: Arc::new(Vec::new()),
            size: size.max(1).next_multiple_of(HUGE_PAGE_SIZE),
        }
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl<D> fmt::Debug for VmConfig<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.host_functions.keys().collect();
        names.sort();
        f.debug_struct("VmConfig")
            .field("program", &self.program)
            .field("memory_size", &self.memory_size)
            .field("timeout", &self.timeout)
            .field("timeout_clock", &self.timeout_clock)
            .field("max_output", &self.max_output)
            .field("host_functions", &names)
            .field("dirty_tracking", &self.dirty_tracking)
            .field("max_preserved", &self.max_preserved)
            .field("scratch_disk", &self.scratch_disk)
            .field("limits", &self.limits)
            .field("features", &self.ext)
            .finish()
    }
}

impl VmConfig {
    /// A config for `program` with the defaults: 64 MiB of memory, a 10 s
    /// timeout per call, outputs up to 256 MiB, no host functions.
    pub fn new(program: GuestProgram) -> Self {
        Self {
            program,
            memory_size: DEFAULT_MEMORY_SIZE,
            timeout: Some(DEFAULT_TIMEOUT),
            timeout_clock: TimeoutClock::Wall,
            max_output: DEFAULT_MAX_OUTPUT,
            host_functions: Arc::default(),
            deferred: Arc::default(),
            dirty_tracking: false,
            max_preserved: DEFAULT_MAX_PRESERVED,
            scratch_disk: None,
            limits: GuestLimits::default(),
            ext: super::ExtSettings::default(),
        }
    }

    /// The same config for VMs that carry data of type `D` for their host
    /// functions (see [`HostCaller::data`](super::HostCaller::data)). Every
    /// VM built from it starts with `D::default()`; set it with
    /// [`VmInstance::set_data`](crate::vm::Vm::set_data) or change it in
    /// place with [`VmInstance::data_mut`](crate::vm::Vm::data_mut). For a
    /// type with no sensible default (a connection), use `Option<T>`.
    ///
    /// Host functions registered before this call keep working; they do
    /// not see the data.
    ///
    /// ```no_run
    /// use snapvm::{GuestProgram, VmConfig, VmInstance};
    ///
    /// #[derive(Default)]
    /// struct Tenant { name: String, calls: u64 }
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?)
    ///     .data_type::<Tenant>()
    ///     .host_function_with_caller("whoami", |caller, _input| {
    ///         let tenant = caller.data();
    ///         tenant.calls += 1;
    ///         Ok(tenant.name.clone().into_bytes())
    ///     });
    /// let mut vm = VmInstance::new(&config)?;
    /// vm.data_mut().name = "acme".into();
    /// # Ok(()) }
    /// ```
    pub fn data_type<D>(self) -> VmConfig<D> {
        let host_functions = self
            .host_functions
            .iter()
            .map(|(name, f)| {
                let f = Arc::clone(f);
                let typed: Arc<HostFnWithCaller<D>> =
                    Arc::new(move |caller: &mut super::HostCaller<'_, D>, input: &[u8]| {
                        f(&mut caller.without_data(&mut ()), input)
                    });
                (name.clone(), typed)
            })
            .collect();
        VmConfig {
            program: self.program,
            memory_size: self.memory_size,
            timeout: self.timeout,
            timeout_clock: self.timeout_clock,
            max_output: self.max_output,
            host_functions: Arc::new(host_functions),
            deferred: self.deferred,
            dirty_tracking: self.dirty_tracking,
            max_preserved: self.max_preserved,
            scratch_disk: self.scratch_disk,
            limits: self.limits,
            ext: self.ext,
        }
    }
}

impl<D> VmConfig<D> {
    /// Guest memory size in bytes: a multiple of 2 MiB between
    /// [`MIN_MEMORY_SIZE`] and [`MAX_MEMORY_SIZE`]. The heap is everything
    /// above the program image.
    pub fn memory_size(mut self, bytes: u64) -> Self {
        self.memory_size = bytes;
        self
    }

    /// Longest a guest call (or init) may run; `None` for no limit. A call
    /// that runs longer fails with [`VmError::Timeout`]. The limit is wall-clock
    /// time, host-function time included; the error never comes early, and
    /// comes late by however long the host takes to schedule the vCPU thread.
    pub fn timeout(mut self, limit: Option<Duration>) -> Self {
        self.timeout = limit;
        self
    }

    /// Which clock [`Self::timeout`] runs on (default
    /// [`TimeoutClock::Wall`]; see [`TimeoutClock::ThreadCpu`] for loaded
    /// hosts).
    pub fn timeout_clock(mut self, clock: TimeoutClock) -> Self {
        self.timeout_clock = clock;
        self
    }

    /// Largest output one call may return; larger ones fail with
    /// [`VmError::OutputTooLarge`].
    pub fn max_output(mut self, bytes: u64) -> Self {
        self.max_output = bytes;
        self
    }

    /// Registers a host function the guest can call by `name`
    /// (`snapvm_guest::host::call`). Registering a name again replaces it.
    pub fn host_function<F>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(&[u8]) -> Result<Vec<u8>, HostFnError> + Send + Sync + 'static,
    {
        self.host_function_with_caller(name, move |_, input| f(input))
    }

    /// Registers a host function that also receives a
    /// [`HostCaller`](super::HostCaller): the guest function calling it, the
    /// VM's generation, the call's deadline and user data. Registering a
    /// name again replaces it.
    pub fn host_function_with_caller<F>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(&mut super::HostCaller<'_, D>, &[u8]) -> Result<Vec<u8>, HostFnError>
            + Send
            + Sync
            + 'static,
    {
        let name = name.into();
        if self.deferred.contains(&name) {
            Arc::make_mut(&mut self.deferred).remove(&name);
        }
        Arc::make_mut(&mut self.host_functions).insert(name, Arc::new(f));
        self
    }

    /// Registers a *deferred* host function: an outbound effect (a
    /// notification, a message, an email) that must not happen for a
    /// transaction attempt that is rolled back.
    ///
    /// Called inside a transaction attempt under a transaction runner
    /// (`snapvm::policy::Transaction`), from `tx::begin` to the function's
    /// return, the call is only recorded: the guest gets an immediate empty
    /// success (`Ok` with no bytes), and the host runs `f` with the
    /// recorded input once the attempt is judged a success — never for an
    /// attempt that is rewound or fails. Anywhere else (before `tx::begin`,
    /// in a plain `invoke`) it runs at once like any host function. At most
    /// [`MAX_DEFERRED_CALLS`](crate::policy::MAX_DEFERRED_CALLS) calls, and inputs
    /// of at most the host-call input limit
    /// ([`Self::host_call_limits`]) in all, are buffered per attempt; a
    /// call over either limit fails for the guest.
    ///
    /// Ordinary (*immediate*) host functions run at once on every attempt:
    /// they may run several times for one successful transaction.
    ///
    /// ```no_run
    /// use snapvm::{GuestProgram, VmConfig};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?)
    ///     .dirty_tracking(true)
    ///     .deferred_host_function("notify", |_caller, message| {
    ///         println!("{}", String::from_utf8_lossy(message));
    ///         Ok(Vec::new())
    ///     });
    /// # Ok(()) }
    /// ```
    pub fn deferred_host_function<F>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(&mut super::HostCaller<'_, D>, &[u8]) -> Result<Vec<u8>, HostFnError>
            + Send
            + Sync
            + 'static,
    {
        let name = name.into();
        self = self.host_function_with_caller(name.clone(), f);
        Arc::make_mut(&mut self.deferred).insert(name);
        self
    }

    /// Registers a typed host function (the `serde` feature): the guest
    /// calls it with `snapvm_guest::host::call_typed::<In, Out>`, and input
    /// and result travel encoded with postcard. An input that does not
    /// decode as `In` fails the guest's call (`HostError::Failed`) without
    /// running `f`.
    ///
    /// ```no_run
    /// # #[cfg(feature = "serde")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use snapvm::{GuestProgram, VmConfig};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Lookup { user: u64 }
    /// #[derive(serde::Serialize)]
    /// struct Profile { name: String }
    ///
    /// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?)
    ///     .typed_host_function("profile", |_caller, q: Lookup| {
    ///         Ok(Profile { name: format!("user {}", q.user) })
    ///     });
    /// # Ok(()) }
    /// # #[cfg(not(feature = "serde"))]
    /// # fn main() {}
    /// ```
    #[cfg(feature = "serde")]
    pub fn typed_host_function<In, Out, F>(self, name: impl Into<String>, f: F) -> Self
    where
        In: serde::de::DeserializeOwned,
        Out: serde::Serialize,
        F: Fn(&mut super::HostCaller<'_, D>, In) -> Result<Out, HostFnError>
            + Send
            + Sync
            + 'static,
    {
        self.host_function_with_caller(name, move |caller, input| {
            let input: In =
                postcard::from_bytes(input).map_err(|e| format!("input does not decode: {e}"))?;
            let out = f(caller, input)?;
            Ok(postcard::to_allocvec(&out).map_err(|e| format!("result does not encode: {e}"))?)
        })
    }

    /// Tracks the guest pages written after a snapshot (KVM dirty logging),
    /// so [`VmInstance::snapshot_diff`](crate::vm::Vm::snapshot_diff)
    /// can capture only those. Off by default: on hosts without hardware
    /// dirty logging every first write to a page after a snapshot costs an
    /// extra fault.
    pub fn dirty_tracking(mut self, on: bool) -> Self {
        self.dirty_tracking = on;
        self
    }

    /// Largest total size of the regions a guest may preserve across resets
    /// (`snapvm_guest::preserve`); default 1 MiB.
    pub fn max_preserved(mut self, bytes: u64) -> Self {
        self.max_preserved = bytes;
        self
    }

    /// Largest input a guest may pass to one host function call, and
    /// largest result a host function may hand back (defaults
    /// [`DEFAULT_MAX_HOST_CALL_INPUT`] and [`DEFAULT_MAX_HOST_CALL_OUTPUT`]).
    /// Past either limit the guest's host call fails
    /// (`HostError::Failed`) and the VM stays ready: the host neither
    /// copies the input nor runs the function.
    pub fn host_call_limits(mut self, max_input: u64, max_output: u64) -> Self {
        self.limits.host_call_input = max_input;
        self.limits.host_call_output = max_output;
        self
    }

    /// Longest guest message the host copies: one log line, or the text of
    /// a panic or abort (default [`DEFAULT_MAX_MESSAGE`]). Longer ones are
    /// truncated.
    pub fn max_message(mut self, bytes: u64) -> Self {
        self.limits.message = bytes;
        self
    }

    /// Guest log bytes the host passes to its logger per call (and for
    /// init), default [`DEFAULT_LOG_BUDGET`]. Past the budget the call's
    /// further log messages are dropped, with one warning, so a guest
    /// cannot flood the host's logs.
    pub fn log_budget(mut self, bytes: u64) -> Self {
        self.limits.log_budget = bytes;
        self
    }

    /// Largest guest profile blob the host stores or offers (default
    /// [`DEFAULT_MAX_PROFILE`]). A larger export is refused
    /// (`ExportError::TooLarge` in the guest) before a byte is copied; a
    /// larger stored blob is never offered.
    pub fn max_profile(mut self, bytes: u64) -> Self {
        self.limits.profile = bytes;
        self
    }

    /// Attaches a scratch disk (see [`ScratchDisk`]).
    pub fn scratch_disk(mut self, disk: ScratchDisk) -> Self {
        self.scratch_disk = Some(disk);
        self
    }

    /// Guest memory plus the scratch disk: the size of the VM's memory
    /// (and of its snapshots).
    pub fn total_memory(&self) -> u64 {
        self.memory_size + self.scratch_disk.as_ref().map_or(0, ScratchDisk::size)
    }

    /// The guest program.
    pub fn program(&self) -> &GuestProgram {
        &self.program
    }

    /// The configured guest memory size in bytes.
    pub fn memory_size_bytes(&self) -> u64 {
        self.memory_size
    }

    /// Whether dirty-page tracking is on (see [`Self::dirty_tracking`]).
    pub fn dirty_tracking_enabled(&self) -> bool {
        self.dirty_tracking
    }

    /// Checks every setting; `VmInstance::new` calls this before creating
    /// anything.
    pub fn validate(&self) -> Result<(), VmError> {
        let size = self.memory_size;
        if size % HUGE_PAGE_SIZE != 0 || !(MIN_MEMORY_SIZE..=MAX_MEMORY_SIZE).contains(&size) {
            return Err(VmError::InvalidConfig {
                field: "memory_size",
                reason: format!(
                    "{size} bytes is not a multiple of 2 MiB between {MIN_MEMORY_SIZE} and {MAX_MEMORY_SIZE}"
                ),
            });
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(VmError::InvalidConfig {
                field: "timeout",
                reason: "a zero timeout would fail every call; use None for no limit".into(),
            });
        }
        if let Some(name) = self
            .host_functions
            .keys()
            .find(|n| n.is_empty() || n.len() as u64 > MAX_FUNCTION_NAME)
        {
            return Err(VmError::InvalidConfig {
                field: "host_function",
                reason: format!("name {name:?} must be 1..={MAX_FUNCTION_NAME} bytes"),
            });
        }
        self.ext.validate()?;
        if self.total_memory() > MAX_MEMORY_SIZE {
            return Err(VmError::InvalidConfig {
                field: "scratch_disk",
                reason: format!("memory plus disk exceeds {MAX_MEMORY_SIZE} bytes"),
            });
        }
        self.program.check_fits(size)?;
        Ok(())
    }
}
