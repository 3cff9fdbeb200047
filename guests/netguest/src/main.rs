//! A guest with networking, for the tests, example and benchmarks of
//! `snapvm::net`: it opens, uses and closes TCP connections on the host's
//! request and keeps them open across calls (and snapshots).
//!
//! Inputs are little-endian words; a connection is named by the id
//! `connect` or `accept` returned. Network errors come back as guest
//! errors with `NetError::code` (1002: connection reset).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::net::{Ipv4Addr, SocketAddrV4};

use snapvm_guest::net::{self, NetError, TcpListener, TcpStream};
use snapvm_guest::{Exports, GuestError};

snapvm_guest::entry!(init);

/// The guest's connections and listener, kept across calls.
struct State {
    streams: BTreeMap<u32, TcpStream>,
    next_id: u32,
    listener: Option<TcpListener>,
}

struct Global(UnsafeCell<Option<State>>);
// SAFETY: a snapvm guest runs one thread with interrupts off: the state is
// never accessed from two contexts at once.
unsafe impl Sync for Global {}
static STATE: Global = Global(UnsafeCell::new(None));

fn state() -> &'static mut State {
    // SAFETY: single-threaded guest (see `Global`); each exported function
    // takes this reference once and drops it before returning.
    unsafe {
        (*STATE.0.get()).get_or_insert_with(|| State {
            streams: BTreeMap::new(),
            next_id: 1,
            listener: None,
        })
    }
}

fn init(exports: &mut Exports) {
    net::init(exports).expect("network device");
    exports
        .export_fallible("connect", connect)
        .export_fallible("listen", listen)
        .export_fallible("accept", accept)
        .export_fallible("send", send)
        .export_fallible("recv", recv)
        .export_fallible("close", close)
        .export_fallible("ping_pong", ping_pong)
        .export_fallible("bulk_send", bulk_send)
        .export_fallible("check", check)
        .export("identity", identity)
        .export("drop_all", |_| {
            // Dropping a stream closes it; its socket is freed once closed.
            state().streams.clear();
            Vec::new()
        })
        .export("raw_exchange", raw_exchange)
        .export("exchanges", |_| net::exchanges().to_le_bytes().to_vec());
}

fn word(input: &[u8], i: usize) -> Result<u32, GuestError> {
    input
        .get(i * 4..i * 4 + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| GuestError::new(1, "input too short"))
}

fn stream(id: u32) -> Result<&'static mut TcpStream, GuestError> {
    state()
        .streams
        .get_mut(&id)
        .ok_or_else(|| GuestError::new(2, "no such connection"))
}

fn add(stream: TcpStream) -> Vec<u8> {
    let st = state();
    let id = st.next_id;
    st.next_id += 1;
    st.streams.insert(id, stream);
    id.to_le_bytes().to_vec()
}

/// `[ip, port]` → connection id.
fn connect(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let addr = SocketAddrV4::new(Ipv4Addr::from(word(input, 0)?), word(input, 1)? as u16);
    Ok(add(TcpStream::connect(addr)?))
}

/// `[port, backlog]`.
fn listen(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let listener = TcpListener::bind(word(input, 0)? as u16, word(input, 1)? as usize)?;
    state().listener = Some(listener);
    Ok(Vec::new())
}

/// `[timeout_ms]` → connection id.
fn accept(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let timeout = word(input, 0)?;
    let listener = state()
        .listener
        .as_mut()
        .ok_or_else(|| GuestError::new(3, "not listening"))?;
    let stream = listener.accept_timeout(Some(u64::from(timeout)))?;
    Ok(add(stream))
}

/// `[id]` + bytes: writes them all and hands them to the host.
fn send(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let s = stream(word(input, 0)?)?;
    s.write_all(&input[4..])?;
    s.flush()?;
    Ok(Vec::new())
}

/// `[id, len, timeout_ms]` → exactly `len` bytes (fewer at end of stream).
fn recv(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let s = stream(word(input, 0)?)?;
    let len = word(input, 1)? as usize;
    s.set_read_timeout(Some(u64::from(word(input, 2)?)));
    let mut buf = vec![0u8; len.min(1 << 20)];
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// `[id]`: closes (FIN) and forgets the connection.
fn close(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let id = word(input, 0)?;
    let mut s = state()
        .streams
        .remove(&id)
        .ok_or_else(|| GuestError::new(2, "no such connection"))?;
    s.shutdown()?;
    Ok(Vec::new())
}

/// `[id, rounds]`: sends one byte and waits for one back, `rounds` times;
/// returns the number of exchange exits it took.
fn ping_pong(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let s = stream(word(input, 0)?)?;
    let rounds = word(input, 1)?;
    let before = net::exchanges();
    let mut b = [0u8; 1];
    for i in 0..rounds {
        s.write_all(&[i as u8])?;
        s.read_exact(&mut b)?;
    }
    Ok((net::exchanges() - before).to_le_bytes().to_vec())
}

/// `[id, len]`: sends `len` bytes.
fn bulk_send(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let s = stream(word(input, 0)?)?;
    let mut left = word(input, 1)? as usize;
    let chunk = [0x42u8; 16 * 1024];
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    s.flush()?;
    Ok(Vec::new())
}

/// `[id]`: `Ok` if the connection is usable, the error it reports if not
/// (without waiting: a zero read timeout).
fn check(input: &[u8]) -> Result<Vec<u8>, GuestError> {
    let s = stream(word(input, 0)?)?;
    s.set_read_timeout(Some(0));
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(_) | Err(NetError::TimedOut) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// The device's identity: MAC (6 bytes) and IPv4 address (4 bytes).
fn identity(_: &[u8]) -> Vec<u8> {
    match net::identity() {
        Ok(id) => [&id.mac[..], &id.ip.octets()[..]].concat(),
        Err(_) => Vec::new(),
    }
}

/// Hands the host `input` as a raw `NetExchange` batch, bypassing the
/// stack (the anti-spoofing tests forge frames with it); returns the
/// host's four result words.
fn raw_exchange(input: &[u8]) -> Vec<u8> {
    use snapvm_guest::abi::{AbiPage, Hypercall, ABI_PAGE_ADDR, PORT_HYPERCALL};
    let page = ABI_PAGE_ADDR as *mut AbiPage;
    let args = [input.as_ptr() as u64, input.len() as u64, 0, 0, 0];
    let mut ret = [0u64; 4];
    // SAFETY: the ABI page is mapped read/write at CPL3 for the guest's
    // whole life; `out` to the hypercall port only exits to the host (the
    // TSS I/O bitmap allows it), and the asm is a memory barrier.
    unsafe {
        for (i, a) in args.iter().enumerate() {
            core::ptr::addr_of_mut!((*page).args[i]).write_volatile(*a);
        }
        core::arch::asm!(
            "out dx, eax",
            in("dx") PORT_HYPERCALL,
            in("eax") Hypercall::NetExchange as u32,
            options(nostack, preserves_flags)
        );
        for (i, r) in ret.iter_mut().enumerate() {
            *r = core::ptr::addr_of!((*page).ret[i]).read_volatile();
        }
    }
    ret.iter().flat_map(|r| r.to_le_bytes()).collect()
}
