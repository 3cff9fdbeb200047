//! The network device as a VM feature: its hypercalls (`NetInfo`,
//! `NetExchange`), served through the core's extension hooks, and the VM's
//! network methods.
//!
//! Every argument is untrusted: both buffers are checked against what the
//! guest could reach itself, the guest's batch is bounded by
//! [`abi::NET_MAX_TX`] and copied into one host buffer the device keeps,
//! what the host writes back is bounded by [`abi::NET_MAX_RX`], and the
//! wait by [`abi::NET_MAX_WAIT_US`] and the call's deadline.

use std::time::{Duration, Instant};

use super::tap::Readiness;
use super::{ConnTracker, Connection, NetConfig, NetDevice, NetIdentity, NetStats};
use crate::abi::{self, Hypercall};
use crate::vm::{CallContext, HypercallFault, Setting, VmConfig, VmError};
use crate::VmInstance;

/// Microseconds of the host's monotonic clock (the guest stack's time).
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists
    // on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

impl Setting for NetConfig {
    fn validate(&self) -> Result<(), VmError> {
        NetConfig::validate(self).map_err(|reason| VmError::InvalidConfig {
            field: "network",
            reason,
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl VmConfig {
    /// Gives the VM a network device on a TAP device (see
    /// [`NetConfig`] and `docs/networking.md`). Each VM built or restored
    /// with this config opens the TAP device and gets this identity: to
    /// restore one snapshot into several VMs, give each its own config with
    /// its own TAP device and identity.
    pub fn network(mut self, network: NetConfig) -> Self {
        self.ext.set(network);
        self
    }
}

/// A VM's network feature: its device, if the config has one.
#[derive(Debug, Default)]
pub(crate) struct NetExt {
    dev: Option<Box<NetDevice>>,
}

impl NetExt {
    /// Opens the network device of `config`, if it has one.
    pub(crate) fn open(config: &VmConfig) -> Result<Self, VmError> {
        let Some(net) = config.ext.get::<NetConfig>() else {
            return Ok(Self::default());
        };
        let device = NetDevice::open(net).map_err(|source| VmError::NetworkDevice {
            tap: net.tap.clone(),
            source,
        })?;
        Ok(Self {
            dev: Some(Box::new(device)),
        })
    }

    /// Serves the network hypercalls; `None` for any other.
    pub(crate) fn hypercall(
        &mut self,
        nr: Hypercall,
        cx: &mut CallContext<'_>,
    ) -> Option<Result<(), VmError>> {
        match nr {
            Hypercall::NetInfo => Some(self.info(cx)),
            Hypercall::NetExchange => Some(self.exchange(cx)),
            _ => None,
        }
    }

    fn info(&mut self, cx: &mut CallContext<'_>) -> Result<(), VmError> {
        let Some(dev) = self.dev.as_deref() else {
            return cx.ret(&[abi::NET_NO_DEVICE, 0, 0, 0]);
        };
        let id = dev.identity();
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&id.mac);
        cx.ret(&[
            abi::NET_OK,
            u64::from_le_bytes(mac),
            u64::from(u32::from(id.ip)) | u64::from(id.prefix_len) << 32,
            u64::from(u32::from(id.gateway)),
        ])
    }

    fn exchange(&mut self, cx: &mut CallContext<'_>) -> Result<(), VmError> {
        let [tx_ptr, tx_len, rx_ptr, rx_cap, wait_us] = cx.args::<5>()?;
        cx.check_user(tx_ptr, tx_len)?;
        cx.check_user(rx_ptr, rx_cap)?;
        if tx_len > abi::NET_MAX_TX {
            return Err(cx.bad(HypercallFault::TooLong {
                len: tx_len,
                limit: abi::NET_MAX_TX,
            }));
        }
        let Some(dev) = self.dev.as_deref_mut() else {
            return cx.ret(&[abi::NET_NO_DEVICE, 0, 0, 0]);
        };
        // Both lengths are bounded above: these never grow past the
        // capacity the device reserved.
        dev.tx_in.resize(tx_len as usize, 0);
        cx.read_into(tx_ptr, &mut dev.tx_in)?;
        dev.transmit_batch();

        let cap = rx_cap.min(abi::NET_MAX_RX) as usize;
        let until = Instant::now() + Duration::from_micros(wait_us.min(abi::NET_MAX_WAIT_US));
        dev.rx_out.clear();
        loop {
            dev.fill_rx(cap);
            let now = Instant::now();
            if !dev.rx_out.is_empty() || now >= until {
                break;
            }
            let left = cx.bounded_wait(until - now);
            if dev.wait_readable(left) == Readiness::Interrupted && cx.interrupted() {
                return Err(VmError::Cancelled);
            }
            cx.check_deadline()?;
        }
        let len = dev.rx_out.len() as u64;
        cx.write(rx_ptr, &dev.rx_out)?;
        cx.ret(&[abi::NET_OK, len, monotonic_us(), 0])
    }

    fn device(&self) -> Option<&NetDevice> {
        self.dev.as_deref()
    }

    fn device_mut(&mut self) -> Option<&mut NetDevice> {
        self.dev.as_deref_mut()
    }
}

impl VmInstance {
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
