//! The network feature's methods on [`VmInstance`] (its device and
//! hypercalls are in [`net`](crate::net)).

use crate::abi;
use crate::net::{ConnTracker, Connection, NetDevice, NetIdentity, NetStats};
use crate::vm::VmError;
use crate::VmInstance;

impl<D> VmInstance<D> {
    /// Ends every open TCP connection of this VM on both sides, so that it
    /// can be halted, snapshotted or moved: each peer gets a RST that
    /// appears to come from the guest, and the guest a RST that appears to
    /// come from the peer, each with the exact sequence number its receiver
    /// expects. Then the guest runs its stack's poll function
    /// ([`abi::NET_POLL_EXPORT`]) until it took the resets in, so a
    /// snapshot taken next holds closed sockets: guest code sees a
    /// connection reset on them, in this VM and in every restored copy.
    ///
    /// Returns how many connections were ended. A VM without a network
    /// device ends none. The VM must be ready.
    pub fn terminate_connections(&mut self) -> Result<usize, VmError> {
        let Some(dev) = self.ext_mut().net.device_mut() else {
            return Ok(0);
        };
        let n = dev.terminate_all();
        self.deliver_queued_frames()?;
        Ok(n)
    }

    /// Makes the guest take in the frames the host queued for it, if any:
    /// one call of its poll function.
    pub(crate) fn deliver_queued_frames(&mut self) -> Result<(), VmError> {
        let queued = self.ext().net.device().is_some_and(NetDevice::has_queued);
        if queued && self.has_function(abi::NET_POLL_EXPORT) {
            self.invoke(abi::NET_POLL_EXPORT, &[])?;
        }
        Ok(())
    }

    /// Queues, for the guest, a reset of each of `connections` (saved with
    /// a snapshot taken without
    /// [`terminate_connections`](Self::terminate_connections)), appearing
    /// to come from the peer; the peers are left alone (they belong to the
    /// VM the snapshot was taken from). The guest takes them in before its
    /// next function runs.
    pub(crate) fn queue_guest_resets(&mut self, connections: &[Connection]) {
        if let Some(dev) = self.ext_mut().net.device_mut() {
            for c in connections {
                for frame in c.termination().to_guest {
                    dev.queue_to_guest(frame);
                }
            }
        }
    }

    /// Before an in-place rewind to a snapshot that tracked `saved`: ends,
    /// at the peer, every connection tracked now that `saved` does not
    /// hold (opened since the snapshot; the rewound guest forgets them),
    /// sets the tracker to `saved`, and queues a guest-side reset for each
    /// of `saved` (as a restore does).
    pub(crate) fn reset_connections_to(&mut self, saved: &[Connection]) {
        if let Some(dev) = self.ext_mut().net.device_mut() {
            dev.reset_to(saved);
        }
        self.queue_guest_resets(saved);
    }

    /// The network device's counters, if the VM has one.
    pub fn net_stats(&self) -> Option<NetStats> {
        self.ext().net.device().map(NetDevice::stats)
    }

    /// The network identity of this VM, if it has a network device.
    pub fn net_identity(&self) -> Option<NetIdentity> {
        self.ext().net.device().map(NetDevice::identity)
    }

    /// The connection tracker of this VM's network device.
    pub fn connections(&self) -> Option<&ConnTracker> {
        self.ext().net.device().map(NetDevice::tracker)
    }
}
