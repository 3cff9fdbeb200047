//! [`HostCaller`]: what a host function knows about the call it serves.

use std::any::Any;
use std::time::Instant;

use super::Generation;

/// The context a host function registered with
/// [`VmConfig::host_function_with_caller`](super::VmConfig::host_function_with_caller)
/// receives, like Wasmtime's `Caller<T>`: which guest function is calling,
/// the VM's generation, the call's deadline, the VM's data — of the type
/// `D` its config names ([`VmConfig::data_type`](super::VmConfig::data_type)),
/// checked at compile time — and the call's own data
/// ([`VmInstance::invoke_with`](crate::vm::Vm::invoke_with), e.g. the
/// request id), without thread-locals.
///
/// ```no_run
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// #[derive(Default)]
/// struct Tenant(&'static str);
/// struct RequestId(u64);
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?)
///     .data_type::<Tenant>()
///     .host_function_with_caller("whoami", |caller, _input| {
///         let tenant = caller.data().0;
///         let request = caller.call_data::<RequestId>().map_or(0, |r| r.0);
///         Ok(format!("{tenant}/{request}/{}", caller.function()).into_bytes())
///     });
/// let mut vm = VmInstance::new(&config)?;
/// vm.set_data(Tenant("acme"));
/// let out = vm.invoke_with("handle", b"", &mut RequestId(7))?;
/// # Ok(()) }
/// ```
///
/// The data's type is checked when the program is compiled: a VM
/// carrying another type cannot be built from the config.
///
/// ```compile_fail
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// #[derive(Default)]
/// struct Tenant(&'static str);
/// #[derive(Default)]
/// struct Other;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?).data_type::<Tenant>();
/// let vm: VmInstance<Other> = VmInstance::new(&config)?;
/// # Ok(()) }
/// ```
pub struct HostCaller<'a, D = ()> {
    pub(super) function: &'a str,
    pub(super) generation: Generation,
    pub(super) deadline: Option<Instant>,
    pub(super) data: &'a mut D,
    pub(super) call_data: Option<&'a mut (dyn Any + Send)>,
}

impl<D> std::fmt::Debug for HostCaller<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCaller")
            .field("function", &self.function)
            .field("generation", &self.generation)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<'a, D> HostCaller<'a, D> {
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

    /// The VM's data (see [`VmConfig::data_type`](super::VmConfig::data_type)).
    pub fn data(&mut self) -> &mut D {
        self.data
    }

    /// The call's user data (passed to `invoke_with`), if it is a `T`.
    /// Call data is chosen per call, so its type is checked here, at run
    /// time; the VM's own data ([`Self::data`]) is typed at compile time.
    pub fn call_data<T: Any>(&mut self) -> Option<&mut T> {
        self.call_data.as_deref_mut().and_then(|d| d.downcast_mut())
    }

    /// The same context without the VM's data, for a host function
    /// registered before [`VmConfig::data_type`](super::VmConfig::data_type).
    pub(super) fn without_data<'b>(&'b mut self, unit: &'b mut ()) -> HostCaller<'b, ()> {
        HostCaller {
            function: self.function,
            generation: self.generation,
            deadline: self.deadline,
            data: unit,
            call_data: self.call_data.as_deref_mut(),
        }
    }
}
