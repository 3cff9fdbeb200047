//! Guest networking (the `net` feature): a TCP/IP stack ([smoltcp]) on the
//! host's paravirtual network device, with a small blocking API.
//!
//! The device is two buffers of frames and one hypercall
//! ([`Hypercall::NetExchange`]): the guest hands the host every frame its
//! stack queued and, in the same exit, waits for frames to arrive (the host
//! polls its TAP device meanwhile). A request/response round trip is one
//! exit. Frames the stack emits are queued, not sent, until the guest next
//! waits, calls [`TcpStream::flush`], or its function returns (the runtime
//! flushes before reporting `Done`).
//!
//! ```ignore
//! use core::net::{Ipv4Addr, SocketAddrV4};
//! use snapvm_guest::net::{self, TcpStream};
//!
//! fn init(exports: &mut snapvm_guest::Exports) {
//!     net::init(exports).expect("this VM has a network device");
//! }
//!
//! fn fetch(_: &[u8]) -> Result<Vec<u8>, GuestError> {
//!     let mut s = TcpStream::connect(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 7))?;
//!     s.write_all(b"ping")?;
//!     let mut buf = [0; 4];
//!     s.read_exact(&mut buf)?;
//!     Ok(buf.to_vec())
//! }
//! ```
//!
//! # Halt, snapshot and restore
//! Before a snapshot the host can end every open connection
//! (`VmInstance::terminate_connections`): the peer gets a RST from the
//! guest's address, and this stack a RST from the peer's, which it takes in
//! at once. Guest code then sees [`NetError::ConnectionReset`] on the old
//! stream, in this VM and in every VM restored from the snapshot, and
//! simply connects again. After a restore the runtime rebuilds the
//! interface with the identity the host gives this copy (its MAC and IP
//! address may differ from the snapshot's); listeners keep listening.
//!
//! [smoltcp]: https://docs.rs/smoltcp

extern crate alloc;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, AnySocket};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use super::{hypercall, ret, set_arg, Exports, GuestCell};
use crate::abi::{self, Hypercall};

/// Bytes of each TCP socket's receive buffer.
const RX_BUFFER: usize = 64 * 1024;
/// Bytes of each TCP socket's send buffer: twice the largest batch, so a
/// bulk sender refills a whole batch per exit while the previous one is
/// still unacknowledged.
const TX_BUFFER: usize = 2 * abi::NET_MAX_BATCH as usize;
/// How long [`TcpStream::connect`] waits by default, in milliseconds.
const CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Why a network operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetError {
    /// The VM has no network device, or [`init`] was not called.
    NoDevice,
    /// The peer reset the connection (or the host ended it before a halt,
    /// snapshot or migration): reconnect.
    ConnectionReset,
    /// The peer refused the connection (or it could not be set up).
    ConnectionRefused,
    /// The operation did not finish in time.
    TimedOut,
    /// The stream was shut down for writing, or the socket is in a state
    /// that does not allow the operation.
    NotConnected,
    /// Too many sockets, or no free local port.
    Exhausted,
    /// The host answered with a status this runtime does not know.
    Protocol(u64),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDevice => f.write_str("no network device"),
            Self::ConnectionReset => f.write_str("connection reset"),
            Self::ConnectionRefused => f.write_str("connection refused"),
            Self::TimedOut => f.write_str("timed out"),
            Self::NotConnected => f.write_str("not connected"),
            Self::Exhausted => f.write_str("out of sockets or ports"),
            Self::Protocol(s) => write!(f, "unexpected network status {s}"),
        }
    }
}

impl From<NetError> for super::GuestError {
    /// An error with code [`NetError::code`] and the error's text.
    fn from(e: NetError) -> Self {
        super::GuestError::new(e.code(), alloc::format!("{e}"))
    }
}

impl NetError {
    /// A stable number for this error, used as the [`GuestError`]
    /// code when it is returned from a guest function (1000 + n).
    ///
    /// [`GuestError`]: super::GuestError
    pub fn code(&self) -> u32 {
        1000 + match self {
            Self::NoDevice => 1,
            Self::ConnectionReset => 2,
            Self::ConnectionRefused => 3,
            Self::TimedOut => 4,
            Self::NotConnected => 5,
            Self::Exhausted => 6,
            Self::Protocol(_) => 7,
        }
    }
}

/// The identity the host gives this VM's network device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
}

/// The device: frames to send, encoded for the host, and frames received.
struct Dev {
    /// Most bytes of frames per exchange, each way: what the host said it
    /// takes ([`abi::NET_MAX_TX`] from hosts that did not say).
    batch: usize,
    tx: Vec<u8>,
    rx: Vec<u8>,
    rx_len: usize,
    rx_pos: usize,
    now_us: u64,
    exchanges: u64,
}

struct Rx<'a>(&'a [u8]);
struct Tx<'a>(&'a mut Vec<u8>);

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let start = self.0.len();
        self.0.extend_from_slice(&(len as u16).to_le_bytes());
        self.0.resize(start + 2 + len, 0);
        f(&mut self.0[start + 2..])
    }
}

impl Dev {
    /// Room for one more full frame in the batch.
    fn tx_room(&self) -> bool {
        self.tx.len() + 2 + abi::NET_MAX_FRAME as usize <= self.batch
    }

    /// Takes the batch size a host announced; the receive buffer follows
    /// it (a restore may move this guest to a host that takes less).
    fn set_batch(&mut self, announced: u64) {
        self.batch = announced.clamp(abi::NET_MAX_TX, abi::NET_MAX_BATCH) as usize;
        self.rx.resize(self.batch, 0);
    }

    /// The next received frame, if any (a malformed tail ends the batch).
    fn next_rx(&mut self) -> Option<(usize, usize)> {
        let rest = self.rx.get(self.rx_pos..self.rx_len)?;
        let [a, b, ..] = *rest else {
            return None;
        };
        let len = usize::from(u16::from_le_bytes([a, b]));
        if rest.len() < 2 + len {
            self.rx_pos = self.rx_len;
            return None;
        }
        let start = self.rx_pos + 2;
        self.rx_pos = start + len;
        Some((start, len))
    }

    /// One exit: sends the queued frames, receives what arrives within
    /// `wait_us`.
    /// Received frames the stack has not taken yet (it stops taking them
    /// while the send batch is full).
    fn rx_pending(&self) -> bool {
        self.rx_pos < self.rx_len
    }

    /// One exit: sends the queued frames, receives what arrives within
    /// `wait_us`. While received frames are still pending it only sends
    /// (an empty receive buffer, no wait), so none is overwritten.
    fn exchange(&mut self, wait_us: u64) -> Result<(), NetError> {
        let receive = !self.rx_pending();
        set_arg(0, self.tx.as_ptr() as u64);
        set_arg(1, self.tx.len() as u64);
        set_arg(
            2,
            if receive {
                self.rx.as_mut_ptr() as u64
            } else {
                0
            },
        );
        set_arg(3, if receive { self.rx.len() as u64 } else { 0 });
        set_arg(
            4,
            if receive {
                wait_us.min(abi::NET_MAX_WAIT_US)
            } else {
                0
            },
        );
        hypercall(Hypercall::NetExchange);
        self.exchanges += 1;
        self.tx.clear();
        match ret(0) {
            abi::NET_OK => {}
            abi::NET_NO_DEVICE => return Err(NetError::NoDevice),
            other => return Err(NetError::Protocol(other)),
        }
        if receive {
            self.rx_len = (ret(1) as usize).min(self.rx.len());
            self.rx_pos = 0;
        }
        self.now_us = self.now_us.max(ret(2));
        Ok(())
    }
}

impl Device for Dev {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        if !self.tx_room() {
            return None;
        }
        let (start, len) = self.next_rx()?;
        Some((Rx(&self.rx[start..start + len]), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        if self.tx_room() {
            Some(Tx(&mut self.tx))
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = abi::NET_MAX_FRAME as usize;
        caps.max_burst_size = None;
        caps
    }
}

struct Net {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Dev,
    identity: Identity,
    next_port: u16,
    /// Sockets of dropped streams, removed once closed.
    orphans: Vec<SocketHandle>,
}

static NET: GuestCell<Option<Net>> = GuestCell::new(None);

fn now(dev: &Dev) -> Instant {
    Instant::from_micros(dev.now_us as i64)
}

/// Asks the host for this VM's network identity.
pub fn identity() -> Result<Identity, NetError> {
    device_info().map(|(identity, _)| identity)
}

/// Asks the host for this VM's network identity and how many bytes of
/// frames it takes per exchange (0 from hosts that predate
/// [`abi::NET_MAX_BATCH`]).
fn device_info() -> Result<(Identity, u64), NetError> {
    hypercall(Hypercall::NetInfo);
    match ret(0) {
        abi::NET_OK => {}
        abi::NET_NO_DEVICE => return Err(NetError::NoDevice),
        other => return Err(NetError::Protocol(other)),
    }
    let mac = ret(1).to_le_bytes();
    let (ip, gw) = (ret(2), ret(3));
    let identity = Identity {
        mac: [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]],
        ip: Ipv4Addr::from(ip as u32),
        prefix_len: ((ip >> 32) as u8).min(32),
        gateway: Ipv4Addr::from(gw as u32),
    };
    // smoltcp refuses (panics on) a multicast or all-zero MAC address.
    if identity.mac[0] & 1 != 0 || identity.mac == [0; 6] {
        return Err(NetError::Protocol(ret(1)));
    }
    Ok((identity, gw >> 32))
}

fn build_iface(dev: &mut Dev, identity: &Identity) -> Interface {
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(identity.mac)));
    config.random_seed = super::random_u64();
    let mut iface = Interface::new(config, dev, now(dev));
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(identity.ip.into(), identity.prefix_len));
    });
    let _ = iface.routes_mut().add_default_ipv4_route(identity.gateway);
    iface
}

/// Sets up networking: asks the host for the device's identity, builds the
/// TCP/IP stack and exports [`abi::NET_POLL_EXPORT`] (which the host calls
/// to have the stack take in frames it queued, e.g. the resets it sends
/// before a snapshot). Call it once, from init.
pub fn init(exports: &mut Exports) -> Result<Identity, NetError> {
    let (identity, batch) = device_info()?;
    let mut dev = Dev {
        batch: abi::NET_MAX_TX as usize,
        tx: Vec::with_capacity(abi::NET_MAX_BATCH as usize),
        rx: Vec::new(),
        rx_len: 0,
        rx_pos: 0,
        now_us: 0,
        exchanges: 0,
    };
    dev.set_batch(batch);
    dev.exchange(0)?;
    let iface = build_iface(&mut dev, &identity);
    let net = Net {
        iface,
        sockets: SocketSet::new(Vec::new()),
        dev,
        identity,
        next_port: 49152 + (super::random_u64() % 16384) as u16,
        orphans: Vec::new(),
    };
    // SAFETY: single-threaded guest (see `GuestCell`); no reference to the
    // state is live.
    unsafe { *NET.get() = Some(net) };
    exports.export(abi::NET_POLL_EXPORT, poll_export);
    super::on_restore(after_restore);
    Ok(identity)
}

fn state() -> Result<&'static mut Net, NetError> {
    // SAFETY: single-threaded guest; callers hold the reference only for
    // the duration of one operation and never across another call here.
    unsafe { (*NET.get()).as_mut() }.ok_or(NetError::NoDevice)
}

impl Net {
    /// Lets the stack process received frames and queue what it sends.
    fn poll(&mut self) {
        let now = now(&self.dev);
        // smoltcp sends at most one segment per socket per poll: poll
        // again while that fills the batch, or frames wait to be taken in.
        loop {
            let queued = self.dev.tx.len();
            let _ = self.iface.poll(now, &mut self.dev, &mut self.sockets);
            let sent = self.dev.tx.len() > queued;
            if !self.dev.tx_room() || !(sent || self.dev.rx_pending()) {
                break;
            }
        }
        let sockets = &mut self.sockets;
        self.orphans.retain(|&h| {
            let closed = sockets.get::<tcp::Socket>(h).state() == tcp::State::Closed;
            if closed {
                sockets.remove(h);
            }
            !closed
        });
    }

    /// Polls until `ready` says yes, exchanging frames with the host while
    /// it waits; gives up after `timeout_ms` (if any).
    fn wait<T>(
        &mut self,
        timeout_ms: Option<u64>,
        mut ready: impl FnMut(&mut SocketSet<'static>) -> Option<T>,
    ) -> Result<T, NetError> {
        let deadline = timeout_ms.map(|ms| self.dev.now_us.saturating_add(ms * 1000));
        loop {
            self.poll();
            if let Some(t) = ready(&mut self.sockets) {
                return Ok(t);
            }
            let now = now(&self.dev);
            // Frames still queued (a full batch): send them without waiting.
            let mut wait = if self.dev.tx_room() && !self.dev.rx_pending() {
                self.iface
                    .poll_delay(now, &self.sockets)
                    .map_or(abi::NET_MAX_WAIT_US, |d| d.total_micros())
            } else {
                0
            };
            if let Some(deadline) = deadline {
                if self.dev.now_us >= deadline {
                    return Err(NetError::TimedOut);
                }
                wait = wait.min(deadline - self.dev.now_us);
            }
            self.dev.exchange(wait)?;
        }
    }

    fn flush(&mut self) -> Result<(), NetError> {
        self.poll();
        while !self.dev.tx.is_empty() {
            self.dev.exchange(0)?;
            self.poll();
        }
        Ok(())
    }

    fn new_socket(&mut self) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
        );
        // No Nagle: frames leave only at the next exchange anyway, so small
        // writes already share an exit, while holding back the tail of a
        // write until the peer acknowledges what is in flight costs a round
        // trip, and up to a delayed ACK (40 ms on Linux) when the segment
        // in flight is short (as at every wrap of the send buffer's ring).
        socket.set_nagle_enabled(false);
        self.sockets.add(socket)
    }

    fn ephemeral_port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port = if port == u16::MAX { 49152 } else { port + 1 };
        port
    }
}

/// The host's poll function: take in queued frames, send what that causes.
fn poll_export(_: &[u8]) -> Vec<u8> {
    if let Ok(net) = state() {
        let _ = net.dev.exchange(0);
        let _ = net.flush();
    }
    Vec::new()
}

/// Restore hook: take in the resets the host queued for the snapshot's
/// connections (addressed to the old identity), then rebuild the interface
/// with this copy's identity and a fresh random seed.
fn after_restore() {
    let Ok(net) = state() else { return };
    // This host may take smaller batches than the one the snapshot was
    // taken on.
    let info = device_info();
    net.dev.set_batch(info.map_or(0, |(_, batch)| batch));
    let _ = net.dev.exchange(0);
    net.poll();
    // Whatever connection is still open belongs to the VM the snapshot was
    // taken from (the host did not know it, or the snapshot came from a
    // file): close it here without a word on the wire — a RST from this
    // copy could end the original's connection.
    for (_, socket) in net.sockets.iter_mut() {
        if let Some(s) = tcp::Socket::downcast_mut(socket) {
            if !matches!(s.state(), tcp::State::Listen | tcp::State::Closed) {
                s.abort();
            }
        }
    }
    net.poll();
    net.dev.tx.clear();
    if let Ok((identity, _)) = info {
        net.identity = identity;
    }
    net.next_port = 49152 + (super::random_u64() % 16384) as u16;
    net.iface = build_iface(&mut net.dev, &net.identity);
    let _ = net.flush();
}

/// Sends frames the stack queued (called by the runtime before `Done`).
pub(crate) fn flush_pending() {
    if let Ok(net) = state() {
        if !net.dev.tx.is_empty() {
            let _ = net.flush();
        }
    }
}

/// How many [`Hypercall::NetExchange`] exits this guest made so far.
pub fn exchanges() -> u64 {
    state().map_or(0, |n| n.dev.exchanges)
}

/// A TCP connection.
#[derive(Debug)]
pub struct TcpStream {
    handle: SocketHandle,
    peer: SocketAddrV4,
    read_timeout_ms: Option<u64>,
}

fn closed_error(socket: &tcp::Socket<'_>) -> Option<NetError> {
    (socket.state() == tcp::State::Closed).then_some(NetError::ConnectionReset)
}

impl TcpStream {
    /// Connects to `peer`, waiting up to 10 seconds.
    pub fn connect(peer: SocketAddrV4) -> Result<Self, NetError> {
        Self::connect_timeout(peer, CONNECT_TIMEOUT_MS)
    }

    /// Connects to `peer`, waiting up to `timeout_ms` milliseconds.
    pub fn connect_timeout(peer: SocketAddrV4, timeout_ms: u64) -> Result<Self, NetError> {
        let net = state()?;
        let handle = net.new_socket();
        let port = net.ephemeral_port();
        let remote = IpEndpoint::new((*peer.ip()).into(), peer.port());
        let socket = net.sockets.get_mut::<tcp::Socket>(handle);
        if socket.connect(net.iface.context(), remote, port).is_err() {
            net.sockets.remove(handle);
            return Err(NetError::Exhausted);
        }
        let outcome = net.wait(Some(timeout_ms), |sockets| {
            let s = sockets.get::<tcp::Socket>(handle);
            match s.state() {
                tcp::State::SynSent | tcp::State::SynReceived => None,
                tcp::State::Closed => Some(Err(NetError::ConnectionRefused)),
                _ => Some(Ok(())),
            }
        });
        match outcome.and_then(|r| r) {
            Ok(()) => Ok(TcpStream {
                handle,
                peer,
                read_timeout_ms: None,
            }),
            Err(e) => {
                net.sockets.get_mut::<tcp::Socket>(handle).abort();
                net.orphans.push(handle);
                Err(e)
            }
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddrV4 {
        self.peer
    }

    /// Limits how long [`read`](Self::read) waits (`None`: until the
    /// call's own deadline).
    pub fn set_read_timeout(&mut self, timeout_ms: Option<u64>) {
        self.read_timeout_ms = timeout_ms;
    }

    /// Reads what has arrived, waiting for at least one byte. `Ok(0)` means
    /// the peer closed its side (end of stream). A reset connection fails
    /// with [`NetError::ConnectionReset`] at once, dropping bytes received
    /// but not read.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        let net = state()?;
        let handle = self.handle;
        net.wait(self.read_timeout_ms, |sockets| {
            let s = sockets.get_mut::<tcp::Socket>(handle);
            // A reset connection reports it at once; what it received but
            // the guest did not read yet is gone with it.
            if let Some(e) = closed_error(s) {
                return Some(Err(e));
            }
            if s.can_recv() {
                return Some(s.recv_slice(buf).map_err(|_| NetError::NotConnected));
            }
            (!s.may_recv()).then_some(Ok(0))
        })?
    }

    /// Reads exactly `buf.len()` bytes; an early end of stream is
    /// [`NetError::NotConnected`].
    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), NetError> {
        while !buf.is_empty() {
            match self.read(buf)? {
                0 => return Err(NetError::NotConnected),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// Queues as much of `data` as the send buffer takes (waiting for room
    /// if it is full); returns how much.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, NetError> {
        let net = state()?;
        let handle = self.handle;
        net.wait(None, |sockets| {
            let s = sockets.get_mut::<tcp::Socket>(handle);
            if let Some(e) = closed_error(s) {
                return Some(Err(e));
            }
            if !s.may_send() {
                return Some(Err(NetError::NotConnected));
            }
            s.can_send()
                .then(|| s.send_slice(data).map_err(|_| NetError::NotConnected))
        })?
    }

    /// Queues all of `data`.
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<(), NetError> {
        while !data.is_empty() {
            let n = self.write(data)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Hands every frame queued so far to the host now (one exit if there
    /// is any), without waiting for an acknowledgement.
    pub fn flush(&mut self) -> Result<(), NetError> {
        let net = state()?;
        net.flush()?;
        closed_error(net.sockets.get::<tcp::Socket>(self.handle)).map_or(Ok(()), Err)
    }

    /// Closes the sending side (FIN); reading continues to work.
    pub fn shutdown(&mut self) -> Result<(), NetError> {
        let net = state()?;
        net.sockets.get_mut::<tcp::Socket>(self.handle).close();
        net.flush()
    }
}

impl Drop for TcpStream {
    /// Closes the connection gracefully; its socket is freed once closed.
    fn drop(&mut self) {
        if let Ok(net) = state() {
            net.sockets.get_mut::<tcp::Socket>(self.handle).close();
            net.orphans.push(self.handle);
        }
    }
}

/// A listening TCP port: up to `backlog` connections are set up while the
/// guest is not in [`accept`](Self::accept).
#[derive(Debug)]
pub struct TcpListener {
    port: u16,
    pending: Vec<SocketHandle>,
}

impl TcpListener {
    /// Listens on `port` of the guest's address, with `backlog` sockets.
    pub fn bind(port: u16, backlog: usize) -> Result<Self, NetError> {
        let net = state()?;
        let mut listener = TcpListener {
            port,
            pending: Vec::new(),
        };
        for _ in 0..backlog.max(1) {
            listener.pending.push(listen(net, port)?);
        }
        Ok(listener)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for a connection, up to `timeout_ms` if given.
    pub fn accept_timeout(&mut self, timeout_ms: Option<u64>) -> Result<TcpStream, NetError> {
        let net = state()?;
        // A connection reset before it was accepted leaves its socket
        // closed: listen with a fresh one.
        for h in &mut self.pending {
            if net.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Closed {
                net.sockets.remove(*h);
                *h = listen(net, self.port)?;
            }
        }
        let pending = &self.pending;
        let (i, peer) = net.wait(timeout_ms, |sockets| {
            pending.iter().enumerate().find_map(|(i, &h)| {
                let s = sockets.get::<tcp::Socket>(h);
                let up = !matches!(
                    s.state(),
                    tcp::State::Listen | tcp::State::SynReceived | tcp::State::Closed
                );
                let peer = s.remote_endpoint()?;
                let smoltcp::wire::IpAddress::Ipv4(ip) = peer.addr;
                up.then_some((i, SocketAddrV4::new(ip, peer.port)))
            })
        })?;
        let handle = self.pending[i];
        self.pending[i] = listen(net, self.port)?;
        Ok(TcpStream {
            handle,
            peer,
            read_timeout_ms: None,
        })
    }

    /// Waits for a connection.
    pub fn accept(&mut self) -> Result<TcpStream, NetError> {
        self.accept_timeout(None)
    }
}

fn listen(net: &mut Net, port: u16) -> Result<SocketHandle, NetError> {
    let handle = net.new_socket();
    let socket = net.sockets.get_mut::<tcp::Socket>(handle);
    if socket
        .listen(IpListenEndpoint { addr: None, port })
        .is_err()
    {
        net.sockets.remove(handle);
        return Err(NetError::Exhausted);
    }
    Ok(handle)
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        if let Ok(net) = state() {
            for &h in &self.pending {
                net.sockets.remove(h);
            }
        }
    }
}
