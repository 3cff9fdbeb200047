//! Guest networking against a real Linux TCP stack: each test makes a TAP
//! device for its VM and a network namespace for the peer (the TAP device
//! moves into it once the VM has opened it), and the peer is an ordinary
//! Python socket program run there with `ip netns exec`.
//!
//! Needs root, `/dev/net/tun`, `ip` and `python3`; skipped without them
//! unless `SNAPVM_REQUIRE_KVM` is set (as in CI, which runs as root).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use snapvm::fuzzing::net::{tcp_frame, Flags};
use snapvm::net::{NetConfig, NetIdentity, TrackerConfig};
use snapvm::policy::{Always, ManagedVm};
use snapvm::{Snapshot, VmConfig, VmError, VmInstance};

const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// `NetError::ConnectionReset` as a guest error code.
const RESET: u32 = 1002;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// Whether this machine can run these tests (root, /dev/net/tun, tools).
fn net_available(test: &str) -> bool {
    if !common::kvm_available(test) {
        return false;
    }
    let missing = if !std::path::Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun is missing")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("the ip tool is missing")
    } else if Command::new("python3").arg("-V").output().is_err() {
        Some("python3 is missing")
    } else if unsafe_geteuid() != 0 {
        Some("not running as root")
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var_os("SNAPVM_REQUIRE_KVM").is_some() => {
            panic!("SNAPVM_REQUIRE_KVM is set but {why}")
        }
        Some(why) => {
            eprintln!("skipped {test}: {why}");
            false
        }
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

macro_rules! require_net {
    () => {
        if !net_available(module_path!()) {
            return;
        }
    };
}

/// A TAP device for one VM and a namespace for its peer, removed on drop.
struct PeerNet {
    tap: String,
    ns: String,
    attached: bool,
}

impl PeerNet {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let net = PeerNet {
            tap: format!("snt{id}"),
            ns: format!("snvtest{id}"),
            attached: false,
        };
        ip(&["tuntap", "add", "dev", &net.tap, "mode", "tap"]);
        ip(&["netns", "add", &net.ns]);
        net
    }

    /// The VM side of this network: guest address `10.0.0.<host>`.
    fn config(&self, base: &VmConfig, host: u8) -> VmConfig {
        self.config_with(base, host, |net| net)
    }

    /// [`Self::config`] with the device's settings changed by `f`.
    fn config_with(
        &self,
        base: &VmConfig,
        host: u8,
        f: impl FnOnce(NetConfig) -> NetConfig,
    ) -> VmConfig {
        base.clone()
            .network(f(NetConfig::new(&self.tap, identity(host))))
    }

    /// Moves the TAP device (which a VM has opened) into the peer's
    /// namespace and gives it the peer's address.
    fn attach(&mut self) {
        ip(&["link", "set", "dev", &self.tap, "netns", &self.ns]);
        self.attached = true;
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "add",
            "10.0.0.1/24",
            "dev",
            &self.tap,
        ]);
        // No IPv6 chatter (router solicitations, MLD) on the guest's link:
        // the tests count the frames the guest receives.
        let sysctl = format!("net.ipv6.conf.{}.disable_ipv6=1", self.tap);
        run(Command::new("ip").args(["netns", "exec", &self.ns, "sysctl", "-qw", &sysctl]));
        ip(&["-n", &self.ns, "link", "set", &self.tap, "up"]);
        ip(&["-n", &self.ns, "link", "set", "lo", "up"]);
    }

    /// Runs a Python program in the peer's namespace.
    fn python(&self, script: &str, args: &[&str]) -> Peer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3", "-u", "-c", script])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3");
        let out = BufReader::new(child.stdout.take().expect("piped"));
        Peer { child, out }
    }

    /// TCP sockets left in the namespace (`ss`), listeners excluded.
    fn sockets(&self) -> Vec<String> {
        run(Command::new("ip").args(["netns", "exec", &self.ns, "ss", "-tanH"]))
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("LISTEN"))
            .map(str::to_string)
            .collect()
    }

    /// The namespace's count of challenge ACKs sent (RFC 5961).
    fn challenge_acks(&self) -> u64 {
        let text =
            run(Command::new("ip").args(["netns", "exec", &self.ns, "cat", "/proc/net/netstat"]));
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if n == "TCPChallengeACK" {
                    return v.parse().expect("a number");
                }
            }
        }
        panic!("no TCPChallengeACK counter in /proc/net/netstat")
    }

    /// Established TCP sockets in the namespace (`ss`).
    fn established(&self) -> Vec<String> {
        self.sockets()
            .into_iter()
            .filter(|l| l.starts_with("ESTAB"))
            .collect()
    }

    /// TCP segments the namespace's kernel received (`Tcp: InSegs` of
    /// `/proc/net/snmp`), whatever became of them.
    fn tcp_in_segs(&self) -> u64 {
        let text =
            run(Command::new("ip").args(["netns", "exec", &self.ns, "cat", "/proc/net/snmp"]));
        let tcp: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let [names, values] = tcp[..] else {
            panic!("no Tcp lines in /proc/net/snmp")
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InSegs")
            .map(|(_, v)| v.parse().expect("a number"))
            .expect("a Tcp InSegs counter")
    }

    /// The MAC address of the peer's side of the TAP device.
    fn peer_mac(&self) -> [u8; 6] {
        let path = format!("/sys/class/net/{}/address", self.tap);
        let text = run(Command::new("ip").args(["netns", "exec", &self.ns, "cat", &path]));
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("a MAC address"))
            .collect();
        bytes.try_into().expect("6 bytes")
    }

    /// Frames the peer side of the TAP device received.
    fn rx_packets(&self) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/rx_packets", self.tap);
        run(Command::new("ip").args(["netns", "exec", &self.ns, "cat", &path]))
            .trim()
            .parse()
            .expect("a number")
    }
}

impl Drop for PeerNet {
    fn drop(&mut self) {
        // Deleting the namespace deletes the TAP device inside it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        if !self.attached {
            let _ = Command::new("ip").args(["link", "del", &self.tap]).output();
        }
    }
}

fn identity(host: u8) -> NetIdentity {
    NetIdentity {
        mac: [0x02, 0x5a, 0, 0, 0, host],
        ip: Ipv4Addr::new(10, 0, 0, host),
        prefix_len: 24,
        gateway: PEER_IP,
    }
}

/// A peer program: its output lines, one at a time.
struct Peer {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Peer {
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read peer output");
        assert!(!line.is_empty(), "the peer exited early");
        line.trim().to_string()
    }

    fn expect(&mut self, want: &str) {
        let got = self.line();
        assert_eq!(got, want, "peer said {got:?}");
    }

    /// Lets the peer go on (it waits for a line on stdin).
    fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("piped");
        stdin.write_all(b"go\n").expect("write to the peer");
        stdin.flush().expect("write to the peer");
    }

    fn wait(mut self) {
        let status = self.child.wait().expect("wait for the peer");
        assert!(status.success(), "peer failed: {status}");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Server: accepts N connections, echoes one message on each, sends 1000
/// bytes on each that the guest never reads (data in flight), and once
/// told to (a line on stdin) reads each connection to its end and reports
/// how it ended: `reset` (ECONNRESET) or something else.
const SERVER: &str = r#"
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.0.1", port))
s.listen(64)
print("listening")
conns = []
for _ in range(n):
    c, _ = s.accept()
    c.sendall(c.recv(100))
    conns.append(c)
for c in conns:
    c.sendall(b"y" * 1000)
print("sent")
sys.stdin.readline()
for c in conns:
    c.settimeout(10)
    try:
        while c.recv(65536):
            pass
        print("eof")
    except ConnectionResetError:
        print("reset")
    except Exception as e:
        print("error", type(e).__name__)
    c.close()
s.close()
"#;

/// Client: opens N connections to the guest, sends one message on each
/// and reads its echo, then goes on as the server does.
const CLIENT: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for i in range(n):
    c = socket.create_connection((host, port), timeout=20)
    conns.append(c)
for i, c in enumerate(conns):
    msg = b"hello %d" % i
    c.sendall(msg)
    got = b""
    while len(got) < len(msg):
        d = c.recv(100)
        if not d:
            break
        got += d
    print("echo" if got == msg else "bad echo %r" % got)
for c in conns:
    c.sendall(b"y" * 1000)
print("sent")
sys.stdin.readline()
for c in conns:
    c.settimeout(10)
    try:
        while c.recv(65536):
            pass
        print("eof")
    except ConnectionResetError:
        print("reset")
    except Exception as e:
        print("error", type(e).__name__)
    c.close()
"#;

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn id_of(out: &[u8]) -> u32 {
    u32::from_le_bytes(out[..4].try_into().expect("a connection id"))
}

fn connect(vm: &mut VmInstance, port: u16) -> u32 {
    id_of(
        &vm.invoke("connect", &words(&[u32::from(PEER_IP), u32::from(port)]))
            .expect("connect"),
    )
}

fn send(vm: &mut VmInstance, id: u32, data: &[u8]) -> Result<(), VmError> {
    let mut input = words(&[id]);
    input.extend_from_slice(data);
    vm.invoke("send", &input).map(drop)
}

fn recv(vm: &mut VmInstance, id: u32, len: u32) -> Result<Vec<u8>, VmError> {
    vm.invoke("recv", &words(&[id, len, 5000]))
}

/// The guest error code of a failed call.
fn guest_code(result: Result<Vec<u8>, VmError>) -> u32 {
    match result {
        Err(VmError::GuestError { code, .. }) => code,
        other => panic!("expected a guest error, got {other:?}"),
    }
}

fn base_config() -> VmConfig {
    common::config("netguest").timeout(Some(Duration::from_secs(30)))
}

/// Waits until `f` holds (the peer's kernel works asynchronously).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `n` bytes from one connection, compares them with the pattern
/// `bulk_pattern` makes, and says `ok` or where they differ.
const BULK_SINK: &str = r#"
import socket, sys
n = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.0.1", 7000))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
want = bytes((i * 7 + i // 1000) % 251 for i in range(n))
got = bytearray()
while len(got) < n:
    b = c.recv(1 << 20)
    if not b:
        break
    got += b
if bytes(got) == want:
    print("ok", flush=True)
else:
    at = next((i for i in range(min(len(got), n)) if got[i] != want[i]), min(len(got), n))
    print("bad: %d bytes, first difference at %d" % (len(got), at), flush=True)
"#;

fn bulk_pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + i / 1000) % 251) as u8).collect()
}

#[test]
fn a_bulk_transfer_arrives_whole_and_in_order() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    // Several batches of merged segments, and an odd tail.
    let n = 3 * 1024 * 1024 + 12_345;
    let mut peer = net.python(BULK_SINK, &[&n.to_string()]);
    peer.expect("listening");
    let id = connect(&mut vm, 7000);
    let before = vm.net_stats().expect("a device");
    let segs_before = net.tcp_in_segs();
    let data = bulk_pattern(n);
    for part in data.chunks(256 * 1024 + 17) {
        send(&mut vm, id, part).expect("send");
    }
    peer.expect("ok");
    let after = vm.net_stats().expect("a device");
    let frames = after.tx_frames - before.tx_frames;
    let segs = net.tcp_in_segs() - segs_before;
    assert!(frames >= (n / 1460) as u64, "{frames} frames");
    // Every frame went out (none dropped), merged: the peer's kernel took
    // in far fewer segments than the guest sent frames.
    assert_eq!(after.dropped_device, before.dropped_device);
    assert!(segs * 4 < frames, "{segs} segments for {frames} frames");
}

#[test]
fn guest_client_connections_are_reset_on_both_sides_before_snapshot() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let mut server = net.python(SERVER, &["7000", "10"]);
    server.expect("listening");

    let ids: Vec<u32> = (0..10).map(|_| connect(&mut vm, 7000)).collect();
    for (i, &id) in ids.iter().enumerate() {
        let msg = format!("ping {i}");
        send(&mut vm, id, msg.as_bytes()).expect("send");
        assert_eq!(
            recv(&mut vm, id, msg.len() as u32).expect("echo"),
            msg.as_bytes()
        );
    }
    server.expect("sent");
    // Data in flight towards the peer too, unread when the reset comes.
    for &id in &ids {
        send(&mut vm, id, &[7; 3000]).expect("send");
    }
    assert_eq!(vm.connections().expect("a device").len(), 10);

    let challenges_before = net.challenge_acks();
    assert_eq!(vm.terminate_connections().expect("terminate"), 10);
    server.go();
    for _ in 0..10 {
        server.expect("reset");
    }
    server.wait();
    assert_eq!(
        net.challenge_acks(),
        challenges_before,
        "the peer sent challenge ACKs"
    );
    eventually("no socket left in the peer namespace", || {
        net.sockets().is_empty()
    });
    assert!(vm.connections().expect("a device").is_empty());

    // The guest's own sockets are closed: each old stream reports a reset.
    for &id in &ids {
        assert_eq!(guest_code(vm.invoke("check", &words(&[id]))), RESET);
    }
    // And new connections work.
    let mut server = net.python(SERVER, &["7001", "1"]);
    server.expect("listening");
    let id = connect(&mut vm, 7001);
    send(&mut vm, id, b"again").expect("send");
    assert_eq!(recv(&mut vm, id, 5).expect("echo"), b"again");
}

#[test]
fn guest_server_connections_are_reset_on_both_sides() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    vm.invoke("listen", &words(&[8000, 16])).expect("listen");
    let mut client = net.python(CLIENT, &["10.0.0.2", "8000", "10"]);

    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(id_of(
            &vm.invoke("accept", &words(&[10_000])).expect("accept"),
        ));
    }
    for (i, &id) in ids.iter().enumerate() {
        let msg = format!("hello {i}");
        assert_eq!(
            recv(&mut vm, id, msg.len() as u32).expect("recv"),
            msg.as_bytes()
        );
        send(&mut vm, id, msg.as_bytes()).expect("echo");
    }
    for _ in 0..10 {
        client.expect("echo");
    }
    client.expect("sent");
    // Data in flight towards the peer, unread when the reset comes.
    for &id in &ids {
        send(&mut vm, id, &[7; 3000]).expect("send");
    }

    let challenges_before = net.challenge_acks();
    assert_eq!(vm.terminate_connections().expect("terminate"), 10);
    client.go();
    for _ in 0..10 {
        client.expect("reset");
    }
    client.wait();
    assert_eq!(
        net.challenge_acks(),
        challenges_before,
        "the peer sent challenge ACKs"
    );
    eventually("no socket left in the peer namespace", || {
        net.sockets().is_empty()
    });
    for &id in &ids {
        assert_eq!(guest_code(vm.invoke("check", &words(&[id]))), RESET);
    }
}

/// Snapshot after termination, restore twice with new identities: both
/// copies see the old connection reset and connect again, each from its
/// own address.
#[test]
fn restored_copies_get_new_identities_and_reconnect() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let mut server = net.python(SERVER, &["7000", "1"]);
    server.expect("listening");
    let id = connect(&mut vm, 7000);
    send(&mut vm, id, b"hi").expect("send");
    assert_eq!(recv(&mut vm, id, 2).expect("echo"), b"hi");
    server.expect("sent");
    assert_eq!(vm.terminate_connections().expect("terminate"), 1);
    server.go();
    server.expect("reset");
    let snapshot: Snapshot = vm.snapshot().expect("snapshot");
    drop(vm);

    let mut seen = Vec::new();
    for host in [3u8, 4] {
        let mut net = PeerNet::new();
        let config = net.config(&base_config(), host);
        let mut copy = VmInstance::restore(&config, &snapshot).expect("restore");
        net.attach();
        assert_eq!(guest_code(copy.invoke("check", &words(&[id]))), RESET);
        let who = copy.invoke("identity", b"").expect("identity");
        assert_eq!(&who[6..], &[10, 0, 0, host]);
        assert_eq!(who[5], host);

        let mut server = net.python(ECHO_PEER_ADDR, &["7000"]);
        server.expect("listening");
        let new_id = connect(&mut copy, 7000);
        // The peer tells which address the guest connected from.
        server.expect(&format!("10.0.0.{host}"));
        send(&mut copy, new_id, b"x").expect("send");
        assert_eq!(recv(&mut copy, new_id, 1).expect("echo"), b"x");
        seen.push(host);
    }
    assert_eq!(seen, [3, 4]);
}

/// A snapshot taken with connections open (crash-consistent): a restored
/// copy sees them reset (from the tracker state the snapshot holds, in
/// memory and in its file), while the original VM keeps using them
/// undisturbed.
#[test]
fn crash_consistent_snapshots_reset_the_copy_and_spare_the_original() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let mut server = net.python(ECHO_PEER_ADDR, &["7000"]);
    server.expect("listening");
    let id = connect(&mut vm, 7000);
    server.expect("10.0.0.2");
    send(&mut vm, id, b"one").expect("send");
    assert_eq!(recv(&mut vm, id, 3).expect("echo"), b"one");

    let snapshot = vm.snapshot().expect("snapshot with a connection open");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("net.snap");
    snapshot.save(&path).expect("save");
    let from_file = Snapshot::load(&path).expect("load");

    for (what, snap) in [("memory", &snapshot), ("file", &from_file)] {
        let mut copy_net = PeerNet::new();
        let copy_config = copy_net.config(&base_config(), 3);
        let mut copy = VmInstance::restore(&copy_config, snap).expect("restore");
        copy_net.attach();
        assert_eq!(
            guest_code(copy.invoke("check", &words(&[id]))),
            RESET,
            "{what}"
        );
        let stats = copy.net_stats().expect("a device");
        assert_eq!(stats.tx_frames, 0, "{what}: the copy sent nothing");
        // The reset came from the saved tracker state, which a file
        // carries too.
        assert!(stats.rx_frames >= 1, "{what}: no reset was injected");
        assert!(copy.connections().expect("a device").is_empty());
    }

    // The original's connection still works.
    send(&mut vm, id, b"two").expect("send after the copies");
    assert_eq!(recv(&mut vm, id, 3).expect("echo"), b"two");
    assert_eq!(vm.connections().expect("a device").len(), 1);
}

/// A crash-consistent snapshot file carries the tracked connections: a VM
/// restored from it elsewhere gets a reset for each old socket (and sends
/// nothing to the peers), makes new connections, and the original keeps
/// its own.
#[test]
fn crash_consistent_snapshot_files_carry_connections_to_the_restored_copy() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let mut servers: Vec<Peer> = [7000u16, 7001]
        .iter()
        .map(|port| {
            let mut server = net.python(ECHO_PEER_ADDR, &[&port.to_string()]);
            server.expect("listening");
            server
        })
        .collect();
    let ids: Vec<u32> = [7000u16, 7001]
        .iter()
        .zip(&mut servers)
        .map(|(&port, server)| {
            let id = connect(&mut vm, port);
            server.expect("10.0.0.2");
            send(&mut vm, id, b"one").expect("send");
            assert_eq!(recv(&mut vm, id, 3).expect("echo"), b"one");
            id
        })
        .collect();
    assert_eq!(vm.connections().expect("a device").len(), 2);

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("net.snap");
    vm.snapshot().expect("snapshot").save(&path).expect("save");
    let from_file = Snapshot::load(&path).expect("load");

    let mut copy_net = PeerNet::new();
    let copy_config = copy_net.config(&base_config(), 3);
    let mut copy = VmInstance::restore(&copy_config, &from_file).expect("restore");
    copy_net.attach();
    for &id in &ids {
        assert_eq!(guest_code(copy.invoke("check", &words(&[id]))), RESET);
    }
    let stats = copy.net_stats().expect("a device");
    assert!(
        stats.rx_frames >= 2,
        "one reset per saved connection expected, the guest got {}",
        stats.rx_frames
    );
    assert_eq!(stats.tx_frames, 0, "the copy sent nothing");
    // New connections from the copy work, with its own address.
    let mut copy_server = copy_net.python(ECHO_PEER_ADDR, &["7000"]);
    copy_server.expect("listening");
    let id = connect(&mut copy, 7000);
    copy_server.expect("10.0.0.3");
    send(&mut copy, id, b"new").expect("send from the copy");
    assert_eq!(recv(&mut copy, id, 3).expect("echo"), b"new");

    // The original's peers saw nothing: both connections still work.
    for &id in &ids {
        send(&mut vm, id, b"two").expect("send after the copy");
        assert_eq!(recv(&mut vm, id, 3).expect("echo"), b"two");
    }
    assert_eq!(net.sockets().len(), 2, "{:?}", net.sockets());
}

/// Accepts two connections, one after the other, and reports how each
/// ended: `reset` (ECONNRESET), `eof` or an error.
const ACCEPT_TWICE: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.0.1", int(sys.argv[1])))
s.listen(4)
print("listening")
for _ in range(2):
    c, a = s.accept()
    print("accepted")
    c.settimeout(10)
    try:
        while c.recv(65536):
            pass
        print("eof")
    except ConnectionResetError:
        print("reset")
    except Exception as e:
        print("error", type(e).__name__)
    c.close()
"#;

/// A VM reset in place after every call (`ManagedVm` with `Always`) ends,
/// at the peer, the connections its call opened: the peer's socket reports
/// a reset on the first RST, nothing is left over, and the next call
/// connects again.
#[test]
fn resets_in_place_end_the_peers_of_connections_opened_since_the_snapshot() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config().dirty_tracking(true), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let ready = vm.snapshot().expect("ready snapshot");
    let mut managed = ManagedVm::new(vm, ready, Always).expect("managed VM");
    let mut server = net.python(ACCEPT_TWICE, &["7000"]);
    server.expect("listening");
    let challenges_before = net.challenge_acks();
    for round in 0..2 {
        let resets = managed.resets();
        managed
            .invoke("connect", &words(&[u32::from(PEER_IP), 7000]))
            .expect("connect");
        assert_eq!(managed.resets(), resets + 1, "round {round}: reset");
        server.expect("accepted");
        server.expect("reset");
        eventually("no socket left in the peer namespace", || {
            net.sockets().is_empty()
        });
        assert!(managed.vm().connections().expect("a device").is_empty());
    }
    server.wait();
    assert_eq!(
        net.challenge_acks(),
        challenges_before,
        "the peer sent challenge ACKs"
    );
    let stats = managed.vm().net_stats().expect("a device");
    assert_eq!(stats.terminated, 2);
}

/// A VM dropped with a connection open (halted without
/// `terminate_connections`) still ends it at the peer: the peer's socket
/// reports a reset instead of staying half-open.
#[test]
fn dropping_a_vm_resets_its_peers() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let mut server = net.python(ACCEPT_TWICE, &["7000"]);
    server.expect("listening");
    let challenges_before = net.challenge_acks();
    let id = connect(&mut vm, 7000);
    server.expect("accepted");
    send(&mut vm, id, b"in flight").expect("send");
    drop(vm);
    server.expect("reset");
    eventually("no socket left in the peer namespace", || {
        net.sockets().is_empty()
    });
    assert_eq!(
        net.challenge_acks(),
        challenges_before,
        "the peer sent challenge ACKs"
    );
}

/// The check the termination tests rely on can fail: a RST one past the
/// sequence number the peer expects (in its window, not exact) earns a
/// challenge ACK and leaves the connection open (RFC 5961).
#[test]
fn an_inexact_rst_earns_a_challenge_ack() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let mut server = net.python(ECHO_PEER_ADDR, &["7000"]);
    server.expect("listening");
    let id = connect(&mut vm, 7000);
    server.expect("10.0.0.2");
    send(&mut vm, id, b"one").expect("send");
    assert_eq!(recv(&mut vm, id, 3).expect("echo"), b"one");

    let c = *vm
        .connections()
        .expect("a device")
        .connections()
        .next()
        .expect("one connection");
    let rst = tcp_frame(
        c.guest_mac,
        c.peer_mac,
        c.key.guest,
        c.key.peer,
        Flags::Rst,
        c.guest.next_seq.wrapping_add(1),
        None,
        0,
        &[],
    );
    let before = net.challenge_acks();
    vm.invoke("raw_exchange", &record(&rst))
        .expect("raw exchange");
    eventually("a challenge ACK", || net.challenge_acks() > before);
    // The connection survived it.
    send(&mut vm, id, b"two").expect("send");
    assert_eq!(recv(&mut vm, id, 3).expect("echo"), b"two");
}

/// Accepts one connection, prints the client's address, echoes.
const ECHO_PEER_ADDR: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.0.1", int(sys.argv[1])))
s.listen(4)
print("listening")
c, a = s.accept()
print(a[0])
while True:
    d = c.recv(100)
    if not d:
        break
    c.sendall(d)
"#;

fn record(frame: &[u8]) -> Vec<u8> {
    let mut r = (frame.len() as u16).to_le_bytes().to_vec();
    r.extend_from_slice(frame);
    r
}

/// An ARP request from `mac`/`ip` for the peer.
fn arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&PEER_IP.octets());
    f
}

/// A UDP datagram from `mac`/`src` to the peer (checksum left zero).
fn udp(mac: [u8; 6], src: Ipv4Addr, payload: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&PEER_IP.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x30, 0x39, 0x30, 0x39]);
    f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend(std::iter::repeat_n(0x61, payload));
    f
}

#[test]
fn forged_flooding_and_oversized_frames_are_dropped_and_counted() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let me = identity(2);
    let other_mac = [0x02, 0x5a, 0, 0, 0, 9];
    let other_ip = Ipv4Addr::new(10, 0, 0, 9);

    let mut batch = Vec::new();
    batch.extend(record(&udp(me.mac, me.ip, 10))); // legitimate
    batch.extend(record(&udp(other_mac, me.ip, 10))); // forged MAC
    batch.extend(record(&udp(me.mac, other_ip, 10))); // forged IP
    batch.extend(record(&arp(me.mac, other_ip))); // forged ARP sender
    batch.extend(record(&udp(me.mac, me.ip, 1600))); // oversized
    let mut ipv6 = udp(me.mac, me.ip, 10);
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    batch.extend(record(&ipv6)); // not IPv4 or ARP
    batch.extend(record(&[0u8; 10])); // shorter than an Ethernet header
    let before = vm.net_stats().expect("a device");
    let rx_before = net.rx_packets();
    vm.invoke("raw_exchange", &batch).expect("raw exchange");
    let after = vm.net_stats().expect("a device");
    assert_eq!(after.tx_frames - before.tx_frames, 1);
    assert_eq!(after.dropped_spoofed - before.dropped_spoofed, 3);
    assert_eq!(after.dropped_malformed - before.dropped_malformed, 2);
    assert_eq!(after.dropped_protocol - before.dropped_protocol, 1);
    eventually("the legitimate frame arrives", || {
        net.rx_packets() > rx_before
    });
    assert_eq!(
        net.rx_packets() - rx_before,
        1,
        "only the legitimate frame left"
    );

    // An ARP flood: the rate limit lets a burst through, drops the rest.
    let flood: Vec<u8> = (0..400).flat_map(|_| record(&arp(me.mac, me.ip))).collect();
    let rx_before = net.rx_packets();
    vm.invoke("raw_exchange", &flood).expect("raw exchange");
    let flooded = vm.net_stats().expect("a device");
    let passed = flooded.tx_frames - after.tx_frames;
    assert!(
        passed <= u64::from(snapvm::net::DEFAULT_ARP_PER_SECOND) + 1,
        "{passed} ARP frames passed"
    );
    assert_eq!(
        flooded.dropped_arp_flood - after.dropped_arp_flood,
        400 - passed
    );
    eventually("the allowed ARP frames arrive", || {
        net.rx_packets() >= rx_before + passed
    });

    // A malformed batch record (length past the end) stops the batch.
    let mut bad = record(&udp(me.mac, me.ip, 10));
    bad.extend_from_slice(&u16::MAX.to_le_bytes());
    bad.extend_from_slice(&[1, 2, 3]);
    vm.invoke("raw_exchange", &bad).expect("raw exchange");
    let last = vm.net_stats().expect("a device");
    assert_eq!(last.tx_frames - flooded.tx_frames, 1);
    assert_eq!(last.dropped_malformed - flooded.dropped_malformed, 1);

    // A batch larger than the limit is a protocol violation.
    let huge = vec![0u8; snapvm::abi::NET_MAX_BATCH as usize + 1];
    let err = vm
        .invoke("raw_exchange", &huge)
        .expect_err("over the limit");
    assert!(matches!(err, VmError::BadHypercall { .. }), "{err:?}");
}

#[test]
fn a_vm_without_a_device_reports_it() {
    if !common::kvm_available(module_path!()) {
        return;
    }
    let config = base_config();
    let err = VmInstance::new(&config).expect_err("init needs a device");
    assert!(matches!(err, VmError::GuestPanic { .. }), "{err:?}");
}

#[test]
fn a_missing_tap_device_name_is_an_invalid_config() {
    let id = identity(2);
    let config = base_config().network(NetConfig::new("", id));
    assert!(matches!(
        VmInstance::new(&config),
        Err(VmError::InvalidConfig {
            field: "network",
            ..
        })
    ));
    let mut multicast = id;
    multicast.mac[0] = 1;
    let config = base_config().network(NetConfig::new("tap0", multicast));
    assert!(matches!(
        VmInstance::new(&config),
        Err(VmError::InvalidConfig {
            field: "network",
            ..
        })
    ));
}

/// Client: opens N connections to the guest one after the other and says
/// how each went (`connected`, `refused`, or an error), then `done`; once
/// told to, reads each open one to its end and says how it ended.
const CONNECT_MANY: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for i in range(n):
    try:
        conns.append(socket.create_connection((host, port), timeout=5))
        print("connected")
    except ConnectionRefusedError:
        print("refused")
    except Exception as e:
        print("error", type(e).__name__)
print("done")
sys.stdin.readline()
for c in conns:
    c.settimeout(10)
    try:
        while c.recv(65536):
            pass
        print("eof")
    except ConnectionResetError:
        print("reset")
    except Exception as e:
        print("error", type(e).__name__)
    c.close()
"#;

/// A table of 4 and a peer that opens 6 connections to the guest: the 2
/// the tracker cannot follow never become connections (the peer's SYN is
/// refused and counted), a SYN from the guest beyond the table never
/// reaches the peer, and after the drop no peer socket is left
/// established.
#[test]
fn syns_beyond_the_tracker_table_never_become_connections() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config_with(&base_config(), 2, |n| {
        n.tracker(TrackerConfig { max_connections: 4 })
    });
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    vm.invoke("listen", &words(&[8000, 16])).expect("listen");
    let mut client = net.python(CONNECT_MANY, &["10.0.0.2", "8000", "6"]);
    for _ in 0..4 {
        vm.invoke("accept", &words(&[10_000])).expect("accept");
    }
    // The guest's stack runs while the last two SYNs arrive.
    for _ in 0..2 {
        let _ = vm.invoke("accept", &words(&[2_000]));
    }
    let said: Vec<String> = (0..6).map(|_| client.line()).collect();
    client.expect("done");
    assert_eq!(
        said.iter().filter(|l| *l == "connected").count(),
        4,
        "{said:?}"
    );
    assert_eq!(
        said.iter().filter(|l| *l == "refused").count(),
        2,
        "{said:?}"
    );
    assert_eq!(vm.connections().expect("a device").len(), 4);
    assert_eq!(vm.net_stats().expect("a device").dropped_table_full, 2);

    // The guest's own SYN beyond the table is dropped before the peer.
    let me = identity(2);
    let peer_mac = net.peer_mac();
    let syn = tcp_frame(
        me.mac,
        peer_mac,
        std::net::SocketAddrV4::new(me.ip, 40_000),
        std::net::SocketAddrV4::new(PEER_IP, 8001),
        Flags::Syn,
        1,
        None,
        1000,
        &[],
    );
    // A bare ACK behind it does reach the peer (and is counted there):
    // once it arrived, so would have the SYN.
    let ack = tcp_frame(
        me.mac,
        peer_mac,
        std::net::SocketAddrV4::new(me.ip, 40_001),
        std::net::SocketAddrV4::new(PEER_IP, 8001),
        Flags::None,
        1,
        Some(1),
        1000,
        &[],
    );
    let segs = net.tcp_in_segs();
    let mut batch = record(&syn);
    batch.extend(record(&ack));
    vm.invoke("raw_exchange", &batch).expect("raw exchange");
    let stats = vm.net_stats().expect("a device");
    assert_eq!(stats.dropped_table_full, 3);
    eventually("the ACK arrives", || net.tcp_in_segs() > segs);
    assert_eq!(net.tcp_in_segs(), segs + 1, "the SYN reached the peer");

    drop(vm);
    client.go();
    for _ in 0..4 {
        client.expect("reset");
    }
    client.wait();
    eventually("no established socket in the peer namespace", || {
        net.established().is_empty()
    });
}

/// A guest that floods SYNs gets at most its rate of new connections to
/// the peer (counted by the peer's kernel); the rest are dropped before
/// the peer and counted.
#[test]
fn a_syn_flood_from_the_guest_is_held_to_its_rate() {
    require_net!();
    const RATE: u64 = 20;
    const FLOOD: u64 = 200;
    let mut net = PeerNet::new();
    let config = net.config_with(&base_config(), 2, |n| n.syn_per_second(RATE as u32));
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let me = identity(2);
    let peer_mac = net.peer_mac();
    let segment = |port: u16, flags, ack| {
        tcp_frame(
            me.mac,
            peer_mac,
            std::net::SocketAddrV4::new(me.ip, port),
            std::net::SocketAddrV4::new(PEER_IP, 9000),
            flags,
            1,
            ack,
            1000,
            &[],
        )
    };
    let mut batch: Vec<u8> = (0..FLOOD as u16)
        .flat_map(|i| record(&segment(30_000 + i, Flags::Syn, None)))
        .collect();
    // A bare ACK behind the flood, which is not limited: once the peer
    // counted it, it counted every SYN that left.
    batch.extend(record(&segment(29_999, Flags::None, Some(1))));
    let before = vm.net_stats().expect("a device");
    let segs = net.tcp_in_segs();
    vm.invoke("raw_exchange", &batch).expect("raw exchange");
    let after = vm.net_stats().expect("a device");
    let passed = after.tx_frames - before.tx_frames - 1;
    // The burst passes; at most a token or two more were earned while the
    // batch ran.
    assert!((RATE..=RATE + 2).contains(&passed), "{passed} SYNs passed");
    assert_eq!(
        after.dropped_syn_rate - before.dropped_syn_rate,
        FLOOD - passed
    );
    eventually("the ACK arrives", || net.tcp_in_segs() > segs + passed);
    assert_eq!(
        net.tcp_in_segs() - segs,
        passed + 1,
        "the peer received more than the SYNs that passed"
    );
    assert_eq!(
        vm.connections().expect("a device").len() as u64,
        passed,
        "a dropped SYN is not tracked"
    );
}

/// Listens on a port (never accepting: a completed handshake shows as an
/// established socket all the same) and watches the TAP device for its
/// SYN-ACK: prints its sequence number, or `none` if none came within 3 s.
const LISTEN_AND_WATCH: &str = r#"
import socket, struct, sys, time
tap, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.0.1", port))
s.listen(8)
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
raw.bind((tap, 0))
raw.settimeout(0.2)
print("listening")
end = time.time() + 3
isn = None
while isn is None and time.time() < end:
    try:
        f = raw.recv(2048)
    except socket.timeout:
        continue
    if len(f) < 54 or f[12:14] != b"\x08\x00" or f[23] != 6:
        continue
    ihl = (f[14] & 15) * 4
    t = f[14 + ihl:]
    sport, = struct.unpack("!H", t[0:2])
    if sport == port and t[13] & 0x12 == 0x12:
        isn, = struct.unpack("!I", t[4:8])
print(isn if isn is not None else "none")
sys.stdin.readline()
"#;

/// `frame`'s IPv4 datagram cut into two fragments after `at` bytes of
/// its payload (a multiple of 8), each a complete Ethernet frame.
fn fragments(frame: &[u8], at: usize) -> [Vec<u8>; 2] {
    let (eth, ip) = frame.split_at(14);
    let (header, payload) = ip.split_at(20);
    let piece = |part: &[u8], offset: usize, more: bool| {
        let mut h = header.to_vec();
        h[2..4].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        let flags = if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&(flags | (offset / 8) as u16).to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let mut sum: u32 = h
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        [eth, &h, part].concat()
    };
    [
        piece(&payload[..at], 0, true),
        piece(&payload[at..], at, false),
    ]
}

/// A guest that opens a connection with a fragmented SYN (the tracker
/// does not reassemble) and completes the handshake by hand cannot keep it
/// out of termination: fragments never leave, so after terminate and drop
/// the peer has no established socket.
#[test]
fn a_fragmented_syn_never_opens_an_untracked_connection() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let mut peer = net.python(LISTEN_AND_WATCH, &[&net.tap, "9100"]);
    peer.expect("listening");
    let me = identity(2);
    let peer_mac = net.peer_mac();
    let guest = std::net::SocketAddrV4::new(me.ip, 41_000);
    let to = std::net::SocketAddrV4::new(PEER_IP, 9100);
    let syn = tcp_frame(
        me.mac,
        peer_mac,
        guest,
        to,
        Flags::Syn,
        5000,
        None,
        1000,
        &[],
    );
    let before = vm.net_stats().expect("a device");
    // An ARP request first, so the peer knows where to answer.
    let mut batch = record(&arp(me.mac, me.ip));
    batch.extend(fragments(&syn, 8).iter().flat_map(|f| record(f)));
    vm.invoke("raw_exchange", &batch).expect("raw exchange");
    let after = vm.net_stats().expect("a device");
    assert_eq!(after.dropped_fragment - before.dropped_fragment, 2);
    assert_eq!(after.tx_frames - before.tx_frames, 1, "a fragment left");
    // Had the SYN arrived, the guest completes the handshake.
    if let Ok(isn) = peer.line().parse::<u32>() {
        let ack = tcp_frame(
            me.mac,
            peer_mac,
            guest,
            to,
            Flags::None,
            5001,
            Some(isn.wrapping_add(1)),
            1000,
            &[],
        );
        vm.invoke("raw_exchange", &record(&ack))
            .expect("raw exchange");
        eventually("the handshake completes", || net.established().len() == 1);
    }
    assert_no_connection_escapes(vm, &net);
}

/// Connects the guest to an echo peer on `port` and returns the
/// connection's id and its tracked record.
fn open_tracked(
    vm: &mut VmInstance,
    net: &PeerNet,
    port: u16,
) -> (Peer, u32, snapvm::net::Connection) {
    let mut server = net.python(ECHO_PEER_ADDR, &[&port.to_string()]);
    server.expect("listening");
    let id = connect(vm, port);
    server.expect("10.0.0.2");
    send(vm, id, b"one").expect("send");
    assert_eq!(recv(vm, id, 3).expect("echo"), b"one");
    let c = *vm
        .connections()
        .expect("a device")
        .connections()
        .find(|c| c.key.peer.port() == port)
        .expect("the connection is tracked");
    (server, id, c)
}

/// Terminates and drops `vm`, then checks that the peer has no
/// established socket left.
fn assert_no_connection_escapes(mut vm: VmInstance, net: &PeerNet) {
    vm.terminate_connections().expect("terminate");
    drop(vm);
    eventually("no established socket in the peer namespace", || {
        net.established().is_empty()
    });
}

/// An exact RST sent to a MAC address that is not the peer's never
/// reaches the peer; the tracker must not forget the connection for it.
#[test]
fn an_rst_to_the_wrong_mac_does_not_end_tracking() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let (_server, _id, c) = open_tracked(&mut vm, &net, 9200);
    let rst = tcp_frame(
        c.guest_mac,
        [0x02, 0x5a, 0, 0, 0, 0x99],
        c.key.guest,
        c.key.peer,
        Flags::Rst,
        c.guest.next_seq,
        None,
        0,
        &[],
    );
    let before = vm.net_stats().expect("a device");
    vm.invoke("raw_exchange", &record(&rst))
        .expect("raw exchange");
    let after = vm.net_stats().expect("a device");
    assert_eq!(after.dropped_destination - before.dropped_destination, 1);
    assert_eq!(vm.connections().expect("a device").len(), 1);
    assert_eq!(net.established().len(), 1, "the peer's socket is open");
    assert_no_connection_escapes(vm, &net);
}

/// One ACK to a bogus MAC address does not make the tracker send its
/// resets there.
#[test]
fn an_ack_to_a_bogus_mac_does_not_redirect_the_resets() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let (_server, _id, c) = open_tracked(&mut vm, &net, 9300);
    assert_eq!(c.peer_mac, net.peer_mac());
    let ack = tcp_frame(
        c.guest_mac,
        [0x02, 0x5a, 0, 0, 0, 0x98],
        c.key.guest,
        c.key.peer,
        Flags::None,
        c.guest.next_seq,
        c.guest.ack,
        1000,
        &[],
    );
    vm.invoke("raw_exchange", &record(&ack))
        .expect("raw exchange");
    let now = *vm
        .connections()
        .expect("a device")
        .get(&c.key)
        .expect("still tracked");
    assert_eq!(now.peer_mac, net.peer_mac());
    assert_no_connection_escapes(vm, &net);
}

/// The peer's MAC address on a [`BridgedNet`].
const BRIDGE_MAC: [u8; 6] = [0x02, 0x5a, 0, 0, 0, 0x01];

/// A peer namespace whose address (10.0.0.1) is on a bridge with several
/// VMs' TAP devices as ports: frames any of them sends reach the same peer
/// (as on a shared L2 network).
struct BridgedNet {
    net: PeerNet,
    extra: Vec<String>,
}

impl BridgedNet {
    fn new() -> Self {
        let net = PeerNet::new();
        let ns = net.ns.clone();
        let mac = BRIDGE_MAC.map(|b| format!("{b:02x}")).join(":");
        ip(&[
            "-n", &ns, "link", "add", "br0", "address", &mac, "type", "bridge",
        ]);
        ip(&["-n", &ns, "addr", "add", "10.0.0.1/24", "dev", "br0"]);
        run(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.br0.disable_ipv6=1",
        ]));
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        BridgedNet {
            net,
            extra: Vec::new(),
        }
    }

    /// A VM config on a TAP device of its own (the first one is the
    /// namespace's own), guest address `10.0.0.<host>`, peer MAC the
    /// bridge's.
    fn config(&mut self, base: &VmConfig, host: u8) -> (VmConfig, String) {
        let tap = if host == 2 {
            self.net.tap.clone()
        } else {
            let tap = format!("{}b{}", self.net.tap, self.extra.len());
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
            self.extra.push(tap.clone());
            tap
        };
        let net = NetConfig::new(&tap, identity(host)).peer_mac(BRIDGE_MAC);
        (base.clone().network(net), tap)
    }

    /// Makes `tap` (opened by a VM) a port of the bridge.
    fn attach(&mut self, tap: &str) {
        let ns = self.net.ns.clone();
        ip(&["link", "set", "dev", tap, "netns", &ns]);
        if tap == self.net.tap {
            self.net.attached = true;
        }
        self.extra.retain(|t| t != tap);
        let sysctl = format!("net.ipv6.conf.{tap}.disable_ipv6=1");
        run(Command::new("ip").args(["netns", "exec", &ns, "sysctl", "-qw", &sysctl]));
        ip(&["-n", &ns, "link", "set", tap, "master", "br0"]);
        ip(&["-n", &ns, "link", "set", tap, "up"]);
    }
}

impl Drop for BridgedNet {
    fn drop(&mut self) {
        for tap in &self.extra {
            let _ = Command::new("ip").args(["link", "del", tap]).output();
        }
    }
}

/// A clone never speaks with the original's identity: VM A has 4 open
/// connections when snapshot S is taken; clone C, restored from S with its
/// own TAP device (on the same network) and identity, is reset in place to
/// S, then serves a request under `ManagedVm<Always>`, then is dropped.
/// A's peers are never reset, and A keeps using its connections.
#[test]
fn a_clone_never_ends_the_originals_connections() {
    require_net!();
    let mut link = BridgedNet::new();
    let base = base_config().dirty_tracking(true);
    let (config_a, tap_a) = link.config(&base, 2);
    let mut a = VmInstance::new(&config_a).expect("boot netguest");
    link.attach(&tap_a);
    let ports = [7000u16, 7001, 7002, 7003];
    let mut servers: Vec<Peer> = ports
        .iter()
        .map(|port| {
            let mut server = link.net.python(ECHO_PEER_ADDR, &[&port.to_string()]);
            server.expect("listening");
            server
        })
        .collect();
    let ids: Vec<u32> = ports
        .iter()
        .zip(&mut servers)
        .map(|(&port, server)| {
            let id = connect(&mut a, port);
            server.expect("10.0.0.2");
            send(&mut a, id, b"one").expect("send");
            assert_eq!(recv(&mut a, id, 3).expect("echo"), b"one");
            id
        })
        .collect();
    assert_eq!(a.connections().expect("a device").len(), 4);
    let challenges_before = link.net.challenge_acks();

    let s = a.snapshot().expect("snapshot with connections open");
    let (config_c, tap_c) = link.config(&base, 5);
    let mut c = VmInstance::restore(&config_c, &s).expect("restore the clone");
    link.attach(&tap_c);
    let who = c.invoke("identity", b"").expect("identity");
    assert_eq!(&who[6..], &[10, 0, 0, 5]);
    c.restore_in_place(&s).expect("reset the clone in place");
    assert!(
        c.connections().expect("a device").is_empty(),
        "the clone adopted the original's connections"
    );
    let mut managed = ManagedVm::new(c, s.clone(), Always).expect("managed clone");
    managed.invoke("identity", b"").expect("a request");
    assert!(managed.vm().connections().expect("a device").is_empty());
    drop(managed);

    // A's connections are alive at both ends: a RST sent before this
    // exchange would have reached the peer first.
    for &id in &ids {
        send(&mut a, id, b"two").expect("send after the clone");
        assert_eq!(recv(&mut a, id, 3).expect("echo"), b"two");
    }
    assert_eq!(link.net.established().len(), 4, "{:?}", link.net.sockets());
    assert_eq!(link.net.challenge_acks(), challenges_before);
    assert_eq!(a.connections().expect("a device").len(), 4);
}

/// An exact RST the TAP device cannot take (its link is down) never
/// reached the peer: the tracker keeps the connection, and ends it later.
#[test]
fn an_rst_the_device_could_not_send_does_not_end_tracking() {
    require_net!();
    let mut net = PeerNet::new();
    let config = net.config(&base_config(), 2);
    let mut vm = VmInstance::new(&config).expect("boot netguest");
    net.attach();
    let (_server, _id, c) = open_tracked(&mut vm, &net, 9400);
    let rst = tcp_frame(
        c.guest_mac,
        c.peer_mac,
        c.key.guest,
        c.key.peer,
        Flags::Rst,
        c.guest.next_seq,
        None,
        0,
        &[],
    );
    ip(&["-n", &net.ns, "link", "set", &net.tap, "down"]);
    let before = vm.net_stats().expect("a device");
    vm.invoke("raw_exchange", &record(&rst))
        .expect("raw exchange");
    let after = vm.net_stats().expect("a device");
    ip(&["-n", &net.ns, "link", "set", &net.tap, "up"]);
    assert_eq!(after.dropped_device - before.dropped_device, 1);
    assert_eq!(after.tx_frames, before.tx_frames);
    assert_eq!(vm.connections().expect("a device").len(), 1);
    assert_eq!(net.established().len(), 1, "the peer's socket is open");
    assert_no_connection_escapes(vm, &net);
}
