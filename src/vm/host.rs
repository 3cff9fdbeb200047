//! [`HostCaller`]: what a host function knows about the call it serves.

use std::any::Any;
use std::time::Instant;

use super::Generation;

/// The context a host function registered with
/// [`VmConfig::host_function_with_caller`](super::VmConfig::host_function_with_caller)
/// receives, like Wasmtime's `Caller<T>`: which guest function is calling,
/// the VM's generation, the call's deadline, and user data — the VM's own
/// ([`VmInstance::set_data`](crate::vm::Vm::set_data), e.g. the tenant)
/// and the call's ([`VmInstance::invoke_with`](crate::vm::Vm::invoke_with),
/// e.g. the request id) — without thread-locals.
///
/// ```no_run
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// struct Tenant(&'static str);
/// struct RequestId(u64);
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?)
///     .host_function_with_caller("whoami", |caller, _input| {
///         let tenant = caller.data::<Tenant>().map_or("?", |t| t.0);
///         let request = caller.call_data::<RequestId>().map_or(0, |r| r.0);
///         Ok(format!("{tenant}/{request}/{}", caller.function()).into_bytes())
///     });
/// let mut vm = VmInstance::new(&config)?;
/// vm.set_data(Tenant("acme"));
/// let out = vm.invoke_with("handle", b"", &mut RequestId(7))?;
/// # Ok(()) }
/// ```
pub struct HostCaller<'a> {
    pub(super) function: &'a str,
    pub(super) generation: Generation,
    pub(super) deadline: Option<Instant>,
    pub(super) data: Option<&'a mut (dyn Any + Send)>,
    pub(super) call_data: Option<&'a mut (dyn Any + Send)>,
}

impl std::fmt::Debug for HostCaller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCaller")
            .field("function", &self.function)
            .field("generation", &self.generation)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl HostCaller<'_> {
    /// The guest function being called (`"(init)"` while the guest's init
    /// function runs).
    pub fn function(&self) -> &str {
        self.function
    }

    /// The VM's generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// When the call times out at the earliest (wall-clock), if it has a
    /// timeout. With `TimeoutClock::ThreadCpu` it may run past this.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The VM's user data, if it is a `T`.
    pub fn data<T: Any>(&mut self) -> Option<&mut T> {
        self.data.as_deref_mut().and_then(|d| d.downcast_mut())
    }

    /// The call's user data (passed to `invoke_with`), if it is a `T`.
    pub fn call_data<T: Any>(&mut self) -> Option<&mut T> {
        self.call_data.as_deref_mut().and_then(|d| d.downcast_mut())
    }
}
