//! The network device's hypercalls and the VM's network methods.
//!
//! Every argument is untrusted: both buffers are checked with
//! [`check_user_range`], the guest's batch is bounded by
//! [`abi::NET_MAX_TX`] and copied into one host buffer the device keeps,
//! what the host writes back is bounded by [`abi::NET_MAX_RX`], and the
//! wait by [`abi::NET_MAX_WAIT_US`] and the call's deadline.

use std::time::{Duration, Instant};

use super::abi_page::{bad, check_user_range, ARGS, RET};
use super::error::{HypercallFault, VmError};
use super::hypercall::Deadline;
use super::{timer, VmConfig, VmInstance};
use crate::abi;
use crate::net::tap::Readiness;
use crate::net::{ConnTracker, Connection, NetDevice, NetIdentity, NetStats};

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

impl VmInstance {
    /// Opens the network device of `config`, if it has one.
    pub(super) fn open_network(&mut self, config: &VmConfig) -> Result<(), VmError> {
        if let Some(net) = &config.network {
            let device = NetDevice::open(net).map_err(|source| VmError::NetworkDevice {
                tap: net.tap.clone(),
                source,
            })?;
            self.net = Some(Box::new(device));
        }
        Ok(())
    }

    pub(super) fn hypercall_net_info(&mut self) -> Result<(), VmError> {
        let Some(dev) = self.net.as_deref() else {
            return self.write_words(RET, &[abi::NET_NO_DEVICE, 0, 0, 0]);
        };
        let id = dev.identity();
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&id.mac);
        self.write_words(
            RET,
            &[
                abi::NET_OK,
                u64::from_le_bytes(mac),
                u64::from(u32::from(id.ip)) | u64::from(id.prefix_len) << 32,
                u64::from(u32::from(id.gateway)),
            ],
        )
    }

    pub(super) fn hypercall_net_exchange(
        &mut self,
        deadline: &mut Option<Deadline>,
    ) -> Result<(), VmError> {
        let [tx_ptr, tx_len, rx_ptr, rx_cap, wait_us] = self.read_words::<5>(ARGS)?;
        let size = self.memory_size();
        check_user_range(size, tx_ptr, tx_len).map_err(|e| bad("NetExchange", e))?;
        check_user_range(size, rx_ptr, rx_cap).map_err(|e| bad("NetExchange", e))?;
        if tx_len > abi::NET_MAX_TX {
            return Err(bad(
                "NetExchange",
                HypercallFault::TooLong {
                    len: tx_len,
                    limit: abi::NET_MAX_TX,
                },
            ));
        }
        let Some(dev) = self.net.as_deref_mut() else {
            return self.write_words(RET, &[abi::NET_NO_DEVICE, 0, 0, 0]);
        };
        // Both lengths are bounded above: these never grow past the
        // capacity the device reserved.
        dev.tx_in.resize(tx_len as usize, 0);
        self.machine
            .ram
            .read(tx_ptr, &mut dev.tx_in)
            .map_err(|e| bad("NetExchange", e.into()))?;
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
            let mut left = until - now;
            if let Some(d) = deadline.as_ref() {
                left = left.min(d.at.saturating_duration_since(now));
            }
            if dev.wait_readable(left) == Readiness::Interrupted && self.interrupt.requested() {
                return Err(VmError::Cancelled);
            }
            if let Some(d) = deadline.as_mut() {
                if Instant::now() >= d.at {
                    let before = d.at;
                    let left = d.check()?;
                    if d.at != before {
                        timer::arm(left).map_err(VmError::Timer)?;
                    }
                }
            }
        }
        let len = dev.rx_out.len() as u64;
        self.machine
            .ram
            .write(rx_ptr, &dev.rx_out)
            .map_err(|e| bad("NetExchange", e.into()))?;
        self.note_host_write(rx_ptr, len);
        self.write_words(RET, &[abi::NET_OK, len, monotonic_us(), 0])
    }

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
        let Some(dev) = self.net.as_deref_mut() else {
            return Ok(0);
        };
        let n = dev.terminate_all();
        self.deliver_queued_frames()?;
        Ok(n)
    }

    /// Makes the guest take in the frames the host queued for it, if any:
    /// one call of its poll function.
    pub(crate) fn deliver_queued_frames(&mut self) -> Result<(), VmError> {
        let queued = self.net.as_deref().is_some_and(NetDevice::has_queued);
        if queued && self.functions.contains_key(abi::NET_POLL_EXPORT) {
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
        if let Some(dev) = self.net.as_deref_mut() {
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
        if let Some(dev) = self.net.as_deref_mut() {
            dev.reset_to(saved);
        }
        self.queue_guest_resets(saved);
    }

    /// The network device's counters, if the VM has one.
    pub fn net_stats(&self) -> Option<NetStats> {
        self.net.as_deref().map(NetDevice::stats)
    }

    /// The network identity of this VM, if it has a network device.
    pub fn net_identity(&self) -> Option<NetIdentity> {
        self.net.as_deref().map(NetDevice::identity)
    }

    /// The connection tracker of this VM's network device.
    pub fn connections(&self) -> Option<&ConnTracker> {
        self.net.as_deref().map(NetDevice::tracker)
    }
}
