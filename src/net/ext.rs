//! The network device as a VM feature: its hypercalls (`NetInfo`,
//! `NetExchange`), served through the core's extension hooks (the VM's
//! network methods are in `instance`).
//!
//! Every argument is untrusted: both buffers are checked against what the
//! guest could reach itself, the guest's batch is bounded by
//! [`abi::NET_MAX_BATCH`] and copied into one host buffer the device keeps,
//! what the host writes back is bounded by [`abi::NET_MAX_BATCH`], and the
//! wait by [`abi::NET_MAX_WAIT_US`] and the call's deadline.

use std::time::{Duration, Instant};

use super::tap::Readiness;
use super::{NetConfig, NetDevice};
use crate::abi::{self, Hypercall};
use crate::vm::{CallContext, HypercallFault, Setting, VmConfig, VmError};

/// Microseconds of the host's monotonic clock (the guest stack's time).
fn monotonic_us() -> u64 {
    let now = crate::sys::clock::monotonic();
    now.as_secs() * 1_000_000 + u64::from(now.subsec_micros())
}

impl Setting for NetConfig {
    fn validate(&self) -> Result<(), VmError> {
        NetConfig::validate(self).map_err(|reason| VmError::InvalidConfig {
            field: "network",
            reason,
        })
    }
}

impl<D> VmConfig<D> {
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
    pub(crate) fn open<D>(config: &VmConfig<D>) -> Result<Self, VmError> {
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
            u64::from(u32::from(id.gateway)) | abi::NET_MAX_BATCH << 32,
        ])
    }

    fn exchange(&mut self, cx: &mut CallContext<'_>) -> Result<(), VmError> {
        let [tx_ptr, tx_len, rx_ptr, rx_cap, wait_us] = cx.args::<5>()?;
        cx.check_user(tx_ptr, tx_len)?;
        cx.check_user(rx_ptr, rx_cap)?;
        if tx_len > abi::NET_MAX_BATCH {
            return Err(cx.bad(HypercallFault::TooLong {
                len: tx_len,
                limit: abi::NET_MAX_BATCH,
            }));
        }
        let Some(dev) = self.dev.as_deref_mut() else {
            return cx.ret(&[abi::NET_NO_DEVICE, 0, 0, 0]);
        };
        // Bounded above (checked): the device's buffer holds it.
        let Some(batch) = dev.tx_buffer(tx_len as usize) else {
            return Err(cx.bad(HypercallFault::TooLong {
                len: tx_len,
                limit: abi::NET_MAX_BATCH,
            }));
        };
        cx.read_into(tx_ptr, batch)?;
        dev.transmit_batch(tx_len as usize);

        let cap = rx_cap.min(abi::NET_MAX_BATCH) as usize;
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

    /// The device, if the VM has one.
    pub(crate) fn device(&self) -> Option<&NetDevice> {
        self.dev.as_deref()
    }

    /// The device, if the VM has one.
    pub(crate) fn device_mut(&mut self) -> Option<&mut NetDevice> {
        self.dev.as_deref_mut()
    }
}
