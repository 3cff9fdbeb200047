//! Networking figures: a netguest VM on a TAP device whose other end sits
//! in a network namespace made for the run, talking to ordinary Linux
//! sockets served by threads of this process that joined that namespace
//! (`setns`). The baselines use the same socket code over host loopback.
//!
//! Wiring (in `benches/report.rs`): `all.extend(figures::net::measure(&ctx));`
//! and `pub mod net;` in `benches/figures/mod.rs`.
//!
//! - `net.rtt_us`: one 1-byte ping-pong on an open connection, guest ↔
//!   peer: the netguest `ping_pong` function runs `ROUNDS` of them in one
//!   call; a sample is the call's time ÷ `ROUNDS`. Baseline
//!   `net.loopback_rtt_us`: the same ping-pong between two loopback
//!   sockets of this process (`TCP_NODELAY`), same rounds. Target ratio
//!   `<= 10`.
//! - `net.exits_per_rtt`: `NetExchange` exits per round trip, as the guest
//!   counts them during `ping_pong` (the call's own exit not included).
//! - `net.throughput_mbps`: `bulk_send` of `BULK` bytes guest → peer on
//!   one connection, timed until the peer has read them all (and answered
//!   one byte). Baseline `net.loopback_mbps`, the same transfer over
//!   loopback. Target ratio `>= 0.3`.
//! - `net.terminate_100_us`: `VmInstance::terminate_connections` with 100
//!   open connections: 200 resets written and the guest's stack run until
//!   it took its 100 in (ready for a snapshot).
//!
//! Skipped, with one line, when not root or without `/dev/net/tun`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use snapvm::net::{NetConfig, NetIdentity};
use snapvm::{GuestProgram, VmConfig, VmInstance};

use super::{Ctx, Figure, Stats, Target};

const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const ECHO_PORT: u16 = 7000;
const SINK_PORT: u16 = 7001;
const HOLD_PORT: u16 = 7002;

/// A TAP device and a peer namespace, removed on drop.
struct Lab {
    tap: String,
    ns: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Lab {
    fn new() -> Option<Self> {
        let id = std::process::id();
        let lab = Lab {
            tap: format!("snb{id}"),
            ns: format!("snvbench{id}"),
        };
        (ip(&["tuntap", "add", "dev", &lab.tap, "mode", "tap"]) && ip(&["netns", "add", &lab.ns]))
            .then_some(lab)
    }

    fn attach(&self) -> bool {
        ip(&["link", "set", "dev", &self.tap, "netns", &self.ns])
            && ip(&[
                "-n",
                &self.ns,
                "addr",
                "add",
                "10.0.0.1/24",
                "dev",
                &self.tap,
            ])
            && ip(&["-n", &self.ns, "link", "set", &self.tap, "up"])
            && ip(&["-n", &self.ns, "link", "set", "lo", "up"])
    }

    /// Runs `f` on a thread inside the peer namespace.
    fn spawn<F: FnOnce() + Send + 'static>(&self, f: F) {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: `ns` is an open namespace file; setns changes only
            // this thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f();
        });
    }

    /// Binds a listener inside the namespace (from its own thread) and
    /// serves each connection with `serve` on a new thread there.
    fn serve(&self, port: u16, serve: fn(TcpStream)) {
        let (tx, rx) = mpsc::channel();
        self.spawn(move || {
            let listener = TcpListener::bind((PEER_IP, port)).expect("bind in the namespace");
            tx.send(()).expect("report");
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || serve(stream));
            }
        });
        rx.recv().expect("listener up");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.tap]).output();
    }
}

fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut b = [0u8; 1];
    while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
}

/// Reads everything; after each 4-byte length prefix `n`, reads `n`
/// bytes and answers one byte.
fn sink(mut s: TcpStream) {
    let mut len = [0u8; 8];
    let mut buf = vec![0u8; 1 << 16];
    while s.read_exact(&mut len).is_ok() {
        let mut left = u64::from_le_bytes(len);
        while left > 0 {
            match s.read(&mut buf[..left.min(1 << 16) as usize]) {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n as u64,
            }
        }
        if s.write_all(&[1]).is_err() {
            return;
        }
    }
}

/// Holds connections open, reading nothing, until the peer resets them.
fn hold(mut s: TcpStream) {
    let mut b = [0u8; 1];
    let _ = s.read(&mut b);
}

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn connect(vm: &mut VmInstance, port: u16) -> u32 {
    let out = vm
        .invoke("connect", &words(&[u32::from(PEER_IP), u32::from(port)]))
        .expect("connect");
    u32::from_le_bytes(out[..4].try_into().expect("an id"))
}

fn skip(why: &str) -> Vec<Figure> {
    println!("net: skipped ({why})");
    Vec::new()
}

/// The networking figures (see the module docs).
pub fn measure(ctx: &Ctx) -> Vec<Figure> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root for TAP devices and network namespaces");
    }
    if !Path::new("/dev/net/tun").exists() {
        return skip("no /dev/net/tun");
    }
    let Some(lab) = Lab::new() else {
        return skip("cannot create a TAP device or a network namespace");
    };
    let path = Path::new(env!("SNAPVM_GUESTS_DIR")).join("netguest");
    let identity = NetIdentity {
        mac: [0x02, 0x5a, 0, 0, 0, 2],
        ip: Ipv4Addr::new(10, 0, 0, 2),
        prefix_len: 24,
        gateway: PEER_IP,
    };
    let config = VmConfig::new(GuestProgram::from_file(&path).expect("netguest"))
        .timeout(Some(Duration::from_secs(60)))
        .network(NetConfig::new(&lab.tap, identity));
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    if !lab.attach() {
        return skip("cannot move the TAP device into the namespace");
    }
    lab.serve(ECHO_PORT, echo);
    lab.serve(SINK_PORT, sink);
    lab.serve(HOLD_PORT, hold);

    let rounds: u32 = if ctx.quick { 50 } else { 200 };
    let samples = ctx.samples(15, 4);

    // Loopback baseline and guest ping-pong, interleaved.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("loopback");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                // First byte says which service: 0 echo, 1 sink.
                let mut kind = [0u8; 1];
                if s.read_exact(&mut kind).is_err() {
                    return;
                }
                if kind[0] == 0 {
                    echo(s);
                } else {
                    sink(s);
                }
            });
        }
    });
    let mut lo = TcpStream::connect(addr).expect("loopback connect");
    lo.set_nodelay(true).expect("nodelay");
    lo.write_all(&[0]).expect("kind");
    let guest_echo = connect(&mut vm, ECHO_PORT);
    let (mut net_rtt, mut lo_rtt, mut exits) = (Vec::new(), Vec::new(), Vec::new());
    // One warm-up round of each.
    for i in 0..=samples {
        let start = Instant::now();
        let out = vm
            .invoke("ping_pong", &words(&[guest_echo, rounds]))
            .expect("ping_pong");
        let t = start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
        let n = u64::from_le_bytes(out[..8].try_into().expect("a count"));
        let start = Instant::now();
        let mut b = [0u8; 1];
        for _ in 0..rounds {
            lo.write_all(&[1]).expect("loopback write");
            lo.read_exact(&mut b).expect("loopback read");
        }
        let l = start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
        if i > 0 {
            net_rtt.push(t);
            lo_rtt.push(l);
            exits.push(n as f64 / f64::from(rounds));
        }
    }
    let lo_fig = Figure::of("net.loopback_rtt_us", &Stats::of(&mut lo_rtt), "us");
    let rtt = Figure::of("net.rtt_us", &Stats::of(&mut net_rtt), "us")
        .against(&lo_fig)
        .target(Target::AtMost(10.0));
    let exits = Figure::of("net.exits_per_rtt", &Stats::of(&mut exits), "exits");

    // Throughput: guest → peer, and loopback → sink.
    let bulk: u32 = if ctx.quick { 2 << 20 } else { 8 << 20 };
    let guest_sink = connect(&mut vm, SINK_PORT);
    let mut lo_sink = TcpStream::connect(addr).expect("loopback connect");
    lo_sink.write_all(&[1]).expect("kind");
    let chunk = vec![0x42u8; 64 * 1024];
    let (mut net_mbps, mut lo_mbps) = (Vec::new(), Vec::new());
    for _ in 0..ctx.samples(5, 2) {
        let start = Instant::now();
        let mut header = words(&[guest_sink]);
        header.extend_from_slice(&u64::from(bulk).to_le_bytes());
        vm.invoke("send", &header).expect("length prefix");
        vm.invoke("bulk_send", &words(&[guest_sink, bulk]))
            .expect("bulk_send");
        let ack = vm
            .invoke("recv", &words(&[guest_sink, 1, 30_000]))
            .expect("sink acknowledges");
        assert_eq!(ack, [1]);
        net_mbps.push(f64::from(bulk) / start.elapsed().as_secs_f64() / 1e6);

        let start = Instant::now();
        lo_sink
            .write_all(&u64::from(bulk).to_le_bytes())
            .expect("prefix");
        let mut left = bulk as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            lo_sink.write_all(&chunk[..n]).expect("loopback bulk");
            left -= n;
        }
        let mut b = [0u8; 1];
        lo_sink.read_exact(&mut b).expect("sink acknowledges");
        lo_mbps.push(f64::from(bulk) / start.elapsed().as_secs_f64() / 1e6);
    }
    let lo_tp = Figure::of("net.loopback_mbps", &Stats::of(&mut lo_mbps), "MB/s");
    let tp = Figure::of("net.throughput_mbps", &Stats::of(&mut net_mbps), "MB/s")
        .against(&lo_tp)
        .target(Target::AtLeast(0.3));

    // Terminate 100 open connections.
    let mut term = Vec::new();
    for _ in 0..ctx.samples(5, 1) {
        for _ in 0..100 {
            connect(&mut vm, HOLD_PORT);
        }
        let open = vm.connections().expect("a device").len();
        let start = Instant::now();
        let ended = vm.terminate_connections().expect("terminate");
        term.push(start.elapsed().as_secs_f64() * 1e6);
        // The first round also ends the echo and sink connections.
        assert!(ended >= 100 && ended == open, "{ended} of {open} ended");
        vm.invoke("drop_all", b"").expect("drop the old streams");
    }
    let terminate = Figure::of("net.terminate_100_us", &Stats::of(&mut term), "us");
    drop(vm);
    drop(lab);
    vec![lo_fig, rtt, exits, lo_tp, tp, terminate]
}
