//! The guest-profile feature's methods on [`VmInstance`] (its hypercalls
//! are in [`trace`](crate::trace)).

use crate::trace::ext::code_id;
use crate::trace::{CodeId, ProfileScope};
use crate::VmInstance;

impl<D> VmInstance<D> {
    /// The code identity profiles of this VM are keyed by.
    pub fn code_id(&self) -> CodeId {
        code_id(self.program_digest(), self.restored_from())
    }

    /// Sets (or clears) where this VM's guest profiles are kept, replacing
    /// the config's [`VmConfig::profiles`](crate::VmConfig::profiles): for a VM restored from a shared
    /// pool for one tenant.
    pub fn set_profiles(&mut self, scope: Option<ProfileScope>) {
        let profiles = &mut self.ext_mut().profiles;
        profiles.scope = scope;
        profiles.pending = None;
    }
}
