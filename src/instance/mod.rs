//! [`VmInstance`]: the VM core ([`vm::Vm`](crate::vm::Vm)) with snapvm's
//! features plugged in through its extension hooks
//! ([`vm::Extension`](crate::vm::Extension)): the network device
//! ([`net`](crate::net)), guest profiles ([`trace`](crate::trace)) and
//! transactions ([`policy::Transaction`](crate::policy::Transaction)).
//!
//! The core knows none of them: it serves the call protocol and hands
//! every other hypercall to [`Features`], which gives it to the feature
//! that owns it.

mod net;
mod profiles;
mod tx;

pub use tx::{TxEnd, MAX_DEFERRED_CALLS};

use crate::abi::Hypercall;
use crate::net::ext::NetExt;
use crate::trace::ext::ProfileExt;
use crate::vm::{sealed, CallContext, Checkpoint, Extension, Vm, VmConfig, VmError};
use tx::TxCall;

/// A KVM micro-VM running one guest program, with every snapvm feature.
///
/// This is the type to use: the VM core [`Vm`] with [`Features`]. See
/// [`Vm`] for its methods.
pub type VmInstance<D = ()> = Vm<Features, D>;

/// The feature set of a [`VmInstance`]: its network device and its guest
/// profiles. Built from the [`VmConfig`] (`VmConfig::network`,
/// `VmConfig::profiles`) with every VM.
#[derive(Debug)]
pub struct Features {
    pub(crate) net: NetExt,
    pub(crate) profiles: ProfileExt,
    pub(crate) tx: TxCall,
}

impl sealed::Sealed for Features {}

impl Extension for Features {
    fn open<D>(config: &VmConfig<D>) -> Result<Self, VmError> {
        Ok(Self {
            net: NetExt::open(config)?,
            profiles: ProfileExt::open(config),
            tx: TxCall::default(),
        })
    }

    fn call_start(&mut self) {
        self.tx.new_call();
    }

    fn call_end(&self) -> Result<(), VmError> {
        self.tx.call_end()
    }

    fn before_reset(&mut self) {
        self.tx.new_call();
    }

    fn defers_host_calls(&self) -> bool {
        self.tx.recording()
    }

    fn defer_host_call(&mut self, name: String, input: Vec<u8>, limit: u64) -> (u64, Vec<u8>) {
        self.tx.defer(name, input, limit)
    }

    fn checkpoint_taken(&mut self, checkpoint: Checkpoint) {
        self.tx.checkpoint_taken(checkpoint);
    }

    fn hypercall(
        &mut self,
        nr: Hypercall,
        cx: &mut CallContext<'_>,
    ) -> Option<Result<(), VmError>> {
        self.tx
            .hypercall(nr, cx)
            .or_else(|| self.net.hypercall(nr, cx))
            .or_else(|| self.profiles.hypercall(nr, cx))
    }
}
