//! Connection recovery across halt, snapshot and migration.
//!
//! When a VM is halted, snapshotted or moved, its open TCP connections
//! cannot survive: the peer's kernel keeps a half-open socket and a restored
//! guest that writes into the old socket fails in confusing ways. snapvm
//! ends each connection cleanly on both sides instead: the host sends the
//! peer a RST that appears to come from the guest, and the guest a RST that
//! appears to come from the peer, each carrying the exact sequence number
//! its receiver expects (RFC 5961: a RST that is merely in the window only
//! earns a challenge ACK from Linux).
//!
//! [`ConnTracker`] is the packet logic, usable without a VM: feed it every
//! Ethernet frame that passes between a guest and its network, in either
//! direction, and ask it for termination frames. It never panics on what it
//! is fed and never allocates on a frame's say-so beyond one table entry
//! per connection, up to a configured limit.
//!
//! ```
//! use snapvm::net::{ConnTracker, Direction, TrackerConfig};
//!
//! let mut tracker = ConnTracker::new(TrackerConfig::default());
//! // Frames seen on the wire (here, not TCP at all: passes untouched).
//! tracker.observe(Direction::FromGuest, &[0u8; 60]);
//! for t in tracker.terminate_all() {
//!     // Write `t.to_peer` to the network and `t.to_guest` into the guest.
//!     let _ = (t.to_peer, t.to_guest);
//! }
//! ```

mod coalesce;
mod device;
pub(crate) mod ext;
pub(crate) mod tap;
pub(crate) mod tracker;

pub(crate) use device::NetDevice;
pub use device::{
    NetConfig, NetIdentity, NetStats, DEFAULT_ARP_PER_SECOND, DEFAULT_MAX_QUEUED,
    DEFAULT_SYN_PER_SECOND,
};
pub use tap::Tap;
pub use tracker::{
    ConnKey, ConnState, ConnTracker, Connection, Direction, Endpoint, Observation, Termination,
    TrackerConfig, TrackerStats,
};
