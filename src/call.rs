//! [`Invoke`]: one call surface for [`VmInstance`], [`ManagedVm`],
//! [`PollingVm`] and [`PooledVm`]; [`Func`] and [`TypedFunc`]: guest
//! functions resolved once and called many times.
//!
//! Each wrapper keeps its own inherent call methods; the trait gives
//! generic code (an executor's request loop, a test harness) the same
//! methods over all of them. Its methods delegate to the inherent ones, so
//! a call through the trait runs exactly what a direct call runs.
//!
//! # Function tables
//! A handle ([`Func`]) remembers its function's index in the table it was
//! resolved from and that table's identity. A table read from the guest at
//! boot, or from a snapshot file, gets a new identity; the identity travels
//! with the table into the snapshots taken of the VM and into the VMs
//! restored from them (a restore installs the snapshot's table with its
//! identity). So a handle skips the name lookup on every VM whose table
//! provably is the one it was resolved from, and looks its name up on any
//! other VM — it never calls a function by an index taken from another
//! table.

use std::any::Any;
use std::fmt;
#[cfg(feature = "serde")]
use std::marker::PhantomData;

use crate::policy::{ManagedVm, PollingVm, PooledVm, RestorePolicy};
use crate::snapshot::Snapshot;
pub use crate::vm::Func;
use crate::vm::{CancelToken, VmError};
use crate::ErrorKind;
use crate::VmInstance;

/// The error of a call through [`Invoke`]: [`VmError`] for a
/// [`VmInstance`], [`crate::Error`] for the wrappers. Generic code reaches
/// the same classification through it as through the concrete types.
///
/// ```no_run
/// use snapvm::{ErrorKind, Invoke, InvokeError};
///
/// /// The HTTP status of a failed call, whatever the VM wrapper.
/// fn status<V: Invoke>(error: &V::Error) -> u16 {
///     match error.kind() {
///         ErrorKind::BadRequest => 400,
///         ErrorKind::Timeout => 504,
///         _ => 500,
///     }
/// }
/// ```
pub trait InvokeError: std::error::Error + From<VmError> {
    /// What kind of failure this is (see [`ErrorKind`]).
    fn kind(&self) -> ErrorKind;

    /// The VM error inside, if this is (or wraps) a VM failure.
    fn vm_error(&self) -> Option<&VmError>;
}

impl InvokeError for VmError {
    fn kind(&self) -> ErrorKind {
        VmError::kind(self)
    }

    fn vm_error(&self) -> Option<&VmError> {
        VmError::vm_error(self)
    }
}

impl InvokeError for crate::Error {
    fn kind(&self) -> ErrorKind {
        crate::Error::kind(self)
    }

    fn vm_error(&self) -> Option<&VmError> {
        crate::Error::vm_error(self)
    }
}

/// One call surface for every way of holding a VM: [`VmInstance`],
/// [`ManagedVm`], [`PollingVm`] and [`PooledVm`] implement it by calling
/// their inherent methods of the same names, so each keeps its own
/// semantics (a `ManagedVm` applies its policy after the call, a
/// `PollingVm` posts it to a hot guest). Write request handling once,
/// generic over the wrapper:
///
/// ```no_run
/// use snapvm::{Invoke, InvokeError};
///
/// /// Serves one request on any VM wrapper.
/// fn serve<V: Invoke>(vm: &mut V, request: &[u8]) -> Result<Vec<u8>, V::Error> {
///     vm.invoke("handle", request)
/// }
/// ```
///
/// The trait is dyn-compatible: `&mut dyn Invoke<Error = snapvm::Error>`
/// holds any wrapper. The generic methods ([`Invoke::call`],
/// [`Invoke::typed_func`]) need a sized type and so are not available
/// through `dyn`; a [`TypedFunc`] makes typed calls through `dyn` too.
///
/// The built-in implementations are the four above; implement it for a
/// wrapper of your own by delegating to the VM it holds.
pub trait Invoke {
    /// The error of a call: [`VmError`] for a [`VmInstance`],
    /// [`crate::Error`] for the wrappers.
    type Error: InvokeError;

    /// Calls guest function `name` with `input` and returns its output
    /// (see [`VmInstance::invoke`]).
    ///
    /// ```no_run
    /// use snapvm::Invoke;
    ///
    /// fn reverse<V: Invoke>(vm: &mut V) -> Result<Vec<u8>, V::Error> {
    ///     vm.invoke("reverse", b"hello")
    /// }
    /// ```
    fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, Self::Error>;

    /// Like [`Invoke::invoke`], with `call_data` for the host functions the
    /// call makes: they see it as
    /// [`HostCaller::call_data`](crate::HostCaller::call_data) (see
    /// [`VmInstance::invoke_with`]).
    ///
    /// ```no_run
    /// use snapvm::Invoke;
    ///
    /// struct RequestId(u64);
    ///
    /// fn handle<V: Invoke>(vm: &mut V, id: u64) -> Result<Vec<u8>, V::Error> {
    ///     vm.invoke_with("handle", b"request", &mut RequestId(id))
    /// }
    /// ```
    fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn Any + Send),
    ) -> Result<Vec<u8>, Self::Error>;

    /// Like [`Invoke::invoke`], cancellable through `cancel` (see
    /// [`CancelToken`] and [`VmInstance::invoke_cancellable`]). A cancelled
    /// call fails with [`VmError::Cancelled`] and poisons the VM; the
    /// wrappers reset it before their next call.
    ///
    /// ```no_run
    /// use snapvm::{CancelToken, Invoke};
    ///
    /// fn handle<V: Invoke>(vm: &mut V, cancel: &CancelToken) -> Result<Vec<u8>, V::Error> {
    ///     vm.invoke_cancellable("handle", b"request", cancel)
    /// }
    /// ```
    fn invoke_cancellable(
        &mut self,
        name: &str,
        input: &[u8],
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, Self::Error>;

    /// Resolves guest function `name` into a handle for
    /// [`Invoke::invoke_func`]; fails with [`VmError::UnknownFunction`] if
    /// the guest exports no such function.
    ///
    /// ```no_run
    /// use snapvm::Invoke;
    ///
    /// fn reverse_all<V: Invoke>(vm: &mut V, inputs: &[&[u8]]) -> Result<(), V::Error> {
    ///     let reverse = vm.func("reverse")?;
    ///     for input in inputs {
    ///         reverse.invoke(vm, input)?;
    ///     }
    ///     Ok(())
    /// }
    /// ```
    fn func(&self, name: &str) -> Result<Func, Self::Error>;

    /// Calls the function `func` names, with `input`. The built-in
    /// implementations skip the name lookup when this VM's function table
    /// is the one `func` was resolved from, and look the name up
    /// otherwise (see [`Func`]); the default looks it up always.
    ///
    /// ```no_run
    /// use snapvm::{Func, Invoke};
    ///
    /// fn handle<V: Invoke>(vm: &mut V, func: &Func) -> Result<Vec<u8>, V::Error> {
    ///     vm.invoke_func(func, b"request")
    /// }
    /// ```
    fn invoke_func(&mut self, func: &Func, input: &[u8]) -> Result<Vec<u8>, Self::Error> {
        self.invoke(func.name(), input)
    }

    /// Calls a typed guest function (the `serde` feature; see
    /// [`VmInstance::call`]): `input` is encoded, the output decoded as
    /// `Out`, with the one encoding every call path uses.
    ///
    /// ```no_run
    /// # #[cfg(feature = "serde")]
    /// # mod example {
    /// use snapvm::Invoke;
    ///
    /// fn sum<V: Invoke>(vm: &mut V) -> Result<i64, V::Error> {
    ///     vm.call("sum", &(40i32, 2i32))
    /// }
    /// # }
    /// ```
    #[cfg(feature = "serde")]
    fn call<In, Out>(&mut self, name: &str, input: &In) -> Result<Out, Self::Error>
    where
        Self: Sized,
        In: serde::Serialize + ?Sized,
        Out: serde::de::DeserializeOwned,
    {
        crate::vm::typed_call(input, |bytes| self.invoke(name, bytes))
    }

    /// Resolves typed guest function `name` into a [`TypedFunc`] (the
    /// `serde` feature); fails with [`VmError::UnknownFunction`] if the
    /// guest exports no such function. The types are not checked against
    /// the guest's: a mismatch shows at the call, as
    /// [`VmError::InputRejected`] or [`VmError::Decode`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "serde")]
    /// # mod example {
    /// use snapvm::Invoke;
    ///
    /// fn sums<V: Invoke>(vm: &mut V) -> Result<i64, V::Error> {
    ///     let sum = vm.typed_func::<(i32, i32), i64>("sum")?;
    ///     Ok(sum.call(vm, &(40, 2))? + sum.call(vm, &(1, 1))?)
    /// }
    /// # }
    /// ```
    #[cfg(feature = "serde")]
    fn typed_func<In, Out>(&self, name: &str) -> Result<TypedFunc<In, Out>, Self::Error>
    where
        Self: Sized,
        In: serde::Serialize + ?Sized,
        Out: serde::de::DeserializeOwned,
    {
        self.func(name).map(TypedFunc::from_func)
    }
}

impl Func {
    /// Calls the function on `vm` with `input` (see
    /// [`Invoke::invoke_func`]).
    ///
    /// ```no_run
    /// # fn f(vm: &mut snapvm::VmInstance) -> Result<(), snapvm::VmError> {
    /// let reverse = vm.func("reverse")?;
    /// assert_eq!(reverse.invoke(vm, b"abc")?, b"cba");
    /// # Ok(()) }
    /// ```
    pub fn invoke<V: Invoke + ?Sized>(
        &self,
        vm: &mut V,
        input: &[u8],
    ) -> Result<Vec<u8>, V::Error> {
        vm.invoke_func(self, input)
    }
}

/// A typed guest function resolved by name (the `serde` feature), like
/// Wasmtime's `TypedFunc`: the function's input and output types are
/// fixed once, and each [`TypedFunc::call`] encodes, calls without the
/// name lookup where it can (see [`Func`]) and decodes. Resolve it with
/// [`VmInstance::typed_func`], [`Snapshot::typed_func`] or
/// [`Invoke::typed_func`].
///
/// Cheap to clone, `Send` and `Sync` whatever `In` and `Out` are: resolve
/// once (from the ready snapshot, say) and share it between threads.
///
/// ```no_run
/// # #[cfg(feature = "serde")]
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// #[derive(serde::Serialize)]
/// struct Point { x: i32, y: i32 }
///
/// let config = VmConfig::new(GuestProgram::from_file("quickstart.elf")?);
/// let mut vm = VmInstance::new(&config)?;
/// let sum_point = vm.typed_func::<Point, i64>("sum_point")?;
/// assert_eq!(sum_point.call(&mut vm, &Point { x: 40, y: 2 })?, 42);
/// # Ok(()) }
/// # #[cfg(not(feature = "serde"))]
/// # fn main() {}
/// ```
#[cfg(feature = "serde")]
pub struct TypedFunc<In: ?Sized, Out> {
    func: Func,
    types: PhantomData<fn(&In) -> Out>,
}

#[cfg(feature = "serde")]
impl<In: ?Sized, Out> Clone for TypedFunc<In, Out> {
    fn clone(&self) -> Self {
        Self {
            func: self.func.clone(),
            types: PhantomData,
        }
    }
}

#[cfg(feature = "serde")]
impl<In: ?Sized, Out> fmt::Debug for TypedFunc<In, Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedFunc")
            .field("name", &self.func.name())
            .field("in", &std::any::type_name::<In>())
            .field("out", &std::any::type_name::<Out>())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "serde")]
impl<In, Out> TypedFunc<In, Out>
where
    In: serde::Serialize + ?Sized,
    Out: serde::de::DeserializeOwned,
{
    /// Gives `func` types.
    fn from_func(func: Func) -> Self {
        Self {
            func,
            types: PhantomData,
        }
    }

    /// Calls the function on `vm`: encodes `input`, calls, decodes the
    /// output as `Out` (as [`Invoke::call`] does). A guest `Err` is
    /// [`VmError::GuestError`], an output that does not decode
    /// [`VmError::Decode`]; `vm` may be any [`Invoke`], a `dyn` one
    /// included.
    ///
    /// ```no_run
    /// # fn f(vm: &mut snapvm::VmInstance) -> Result<(), snapvm::VmError> {
    /// let sum = vm.typed_func::<(i32, i32), i64>("sum")?;
    /// assert_eq!(sum.call(vm, &(40, 2))?, 42);
    /// # Ok(()) }
    /// ```
    pub fn call<V: Invoke + ?Sized>(&self, vm: &mut V, input: &In) -> Result<Out, V::Error> {
        crate::vm::typed_call(input, |bytes| vm.invoke_func(&self.func, bytes))
    }

    /// The untyped handle.
    ///
    /// ```no_run
    /// # fn f(vm: &snapvm::VmInstance) -> Result<(), snapvm::VmError> {
    /// let sum = vm.typed_func::<(i32, i32), i64>("sum")?;
    /// assert_eq!(sum.func().name(), "sum");
    /// # Ok(()) }
    /// ```
    pub fn func(&self) -> &Func {
        &self.func
    }
}

impl<D> VmInstance<D> {
    /// Resolves exported function `name` into a [`Func`]; fails with
    /// [`VmError::UnknownFunction`] if the guest exports no such function.
    ///
    /// ```no_run
    /// # fn f(vm: &mut snapvm::VmInstance) -> Result<(), snapvm::VmError> {
    /// let reverse = vm.func("reverse")?;
    /// assert_eq!(reverse.invoke(vm, b"abc")?, b"cba");
    /// # Ok(()) }
    /// ```
    pub fn func(&self, name: &str) -> Result<Func, VmError> {
        let index = self.function_index(name)?;
        Ok(Func::new(name, index, self.function_table()))
    }

    /// Resolves typed function `name` into a [`TypedFunc`] (the `serde`
    /// feature); fails with [`VmError::UnknownFunction`] if the guest
    /// exports no such function.
    ///
    /// ```no_run
    /// # fn f(vm: &mut snapvm::VmInstance) -> Result<(), snapvm::VmError> {
    /// let sum = vm.typed_func::<(i32, i32), i64>("sum")?;
    /// assert_eq!(sum.call(vm, &(40, 2))?, 42);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "serde")]
    pub fn typed_func<In, Out>(&self, name: &str) -> Result<TypedFunc<In, Out>, VmError>
    where
        In: serde::Serialize + ?Sized,
        Out: serde::de::DeserializeOwned,
    {
        self.func(name).map(TypedFunc::from_func)
    }
}

impl Snapshot {
    /// Resolves function `name` of the guest captured here into a
    /// [`Func`]: without the name lookup on every VM restored from this
    /// snapshot (a pool's, say). Fails with [`VmError::UnknownFunction`]
    /// if the guest exports no such function.
    ///
    /// ```no_run
    /// # fn f(pool: &snapvm::ReadyPool<snapvm::policy::Always>) -> Result<(), snapvm::Error> {
    /// let handle = pool.ready().func("handle")?;
    /// let mut vm = pool.get()?;
    /// handle.invoke(&mut vm, b"request")?;
    /// # Ok(()) }
    /// ```
    pub fn func(&self, name: &str) -> Result<Func, VmError> {
        let guest = &self.inner.guest;
        guest
            .functions
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, index)| Func::new(name, index, guest.function_table))
            .ok_or_else(|| VmError::UnknownFunction { name: name.into() })
    }

    /// Resolves typed function `name` of the guest captured here into a
    /// [`TypedFunc`] (the `serde` feature; see [`Snapshot::func`]).
    ///
    /// ```no_run
    /// # fn f(pool: &snapvm::ReadyPool<snapvm::policy::Always>) -> Result<(), snapvm::Error> {
    /// let sum = pool.ready().typed_func::<(i32, i32), i64>("sum")?;
    /// let mut vm = pool.get()?;
    /// assert_eq!(sum.call(&mut vm, &(40, 2))?, 42);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "serde")]
    pub fn typed_func<In, Out>(&self, name: &str) -> Result<TypedFunc<In, Out>, VmError>
    where
        In: serde::Serialize + ?Sized,
        Out: serde::de::DeserializeOwned,
    {
        self.func(name).map(TypedFunc::from_func)
    }
}

impl<D> Invoke for VmInstance<D> {
    type Error = VmError;

    fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, VmError> {
        VmInstance::<D>::invoke(self, name, input)
    }

    fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn Any + Send),
    ) -> Result<Vec<u8>, VmError> {
        VmInstance::<D>::invoke_with(self, name, input, call_data)
    }

    fn invoke_cancellable(
        &mut self,
        name: &str,
        input: &[u8],
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, VmError> {
        VmInstance::<D>::invoke_cancellable(self, name, input, cancel)
    }

    fn func(&self, name: &str) -> Result<Func, VmError> {
        VmInstance::<D>::func(self, name)
    }

    fn invoke_func(&mut self, func: &Func, input: &[u8]) -> Result<Vec<u8>, VmError> {
        self.invoke_resolved(func, input, None)
    }
}

impl<P: RestorePolicy, D> Invoke for ManagedVm<P, D> {
    type Error = crate::Error;

    fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        ManagedVm::invoke(self, name, input)
    }

    fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn Any + Send),
    ) -> Result<Vec<u8>, crate::Error> {
        ManagedVm::invoke_with(self, name, input, call_data)
    }

    fn invoke_cancellable(
        &mut self,
        name: &str,
        input: &[u8],
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, crate::Error> {
        ManagedVm::invoke_cancellable(self, name, input, cancel)
    }

    fn func(&self, name: &str) -> Result<Func, crate::Error> {
        Ok(self.vm().func(name)?)
    }

    fn invoke_func(&mut self, func: &Func, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        self.invoke_resolved(func, input)
    }
}

impl<P: RestorePolicy, D: Send + 'static> Invoke for PollingVm<P, D> {
    type Error = crate::Error;

    fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        PollingVm::invoke(self, name, input)
    }

    fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn Any + Send),
    ) -> Result<Vec<u8>, crate::Error> {
        PollingVm::invoke_with(self, name, input, call_data)
    }

    fn invoke_cancellable(
        &mut self,
        name: &str,
        input: &[u8],
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, crate::Error> {
        PollingVm::invoke_cancellable(self, name, input, cancel)
    }

    fn func(&self, name: &str) -> Result<Func, crate::Error> {
        Ok(self.resolve(name)?)
    }

    fn invoke_func(&mut self, func: &Func, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        self.invoke_resolved(func, input)
    }
}

impl<P: RestorePolicy, D: Default + Send + 'static> Invoke for PooledVm<'_, P, D> {
    type Error = crate::Error;

    fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        ManagedVm::invoke(self, name, input)
    }

    fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn Any + Send),
    ) -> Result<Vec<u8>, crate::Error> {
        ManagedVm::invoke_with(self, name, input, call_data)
    }

    fn invoke_cancellable(
        &mut self,
        name: &str,
        input: &[u8],
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, crate::Error> {
        ManagedVm::invoke_cancellable(self, name, input, cancel)
    }

    fn func(&self, name: &str) -> Result<Func, crate::Error> {
        Invoke::func(&**self, name)
    }

    fn invoke_func(&mut self, func: &Func, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        Invoke::invoke_func(&mut **self, func, input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::TableId;

    #[test]
    fn table_ids_are_fresh_and_never_empty() {
        let (a, b) = (TableId::fresh(), TableId::fresh());
        assert_ne!(a, b);
        assert_ne!(a, TableId::EMPTY);
        assert_ne!(b, TableId::EMPTY);
    }

    #[test]
    fn a_handle_gives_its_index_only_for_its_own_table() {
        let table = TableId::fresh();
        let func = Func::new("echo", 3, table);
        assert_eq!(func.index_in(table), Some(3));
        assert_eq!(func.index_in(TableId::fresh()), None);
        assert_eq!(func.index_in(TableId::EMPTY), None);
        assert_eq!(func.name(), "echo");
    }

    #[test]
    fn handles_are_send_and_sync_whatever_their_types() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Func>();
        #[cfg(feature = "serde")]
        assert_send_sync::<TypedFunc<std::rc::Rc<u8>, std::cell::Cell<u8>>>();
    }

    #[test]
    fn the_trait_is_dyn_compatible() {
        fn takes(_: Option<&mut dyn Invoke<Error = crate::Error>>) {}
        takes(None);
    }
}
