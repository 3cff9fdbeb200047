//! A guest holds a TCP connection across a halt and a restore.
//!
//! The example makes a TAP device and a network namespace for the peer (an
//! echo server on a thread of this process that joined the namespace),
//! boots the `netguest` guest with a network device, and has it connect and
//! exchange a message. Then it halts the VM the way an executor would
//! before a snapshot or a migration: `terminate_connections` resets the
//! connection on both sides (the peer sees `ECONNRESET` at once, not a
//! half-open socket), the snapshot is taken, and the VM dropped. A new VM
//! restored from the snapshot, with a new identity, finds the old stream
//! reset and simply reconnects.
//!
//! ```text
//! sudo cargo run --example net_recovery
//! ```
//!
//! Needs root (TAP devices, namespaces), `/dev/net/tun`, `/dev/kvm` and the
//! `ip` tool; it removes what it created.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;

use snapvm::net::{NetConfig, NetIdentity};
use snapvm::{GuestProgram, VmConfig, VmError, VmInstance};

const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PORT: u16 = 7000;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The TAP devices and the namespace, removed on drop.
struct Lab {
    ns: String,
    taps: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
        for tap in &self.taps {
            let _ = ip(&["link", "del", tap]);
        }
    }
}

impl Lab {
    /// A new TAP device in this namespace, for a VM to open.
    fn tap(&mut self) -> Result<String, String> {
        let name = format!("snx{}x{}", std::process::id(), self.taps.len());
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        self.taps.push(name.clone());
        Ok(name)
    }

    /// Moves `tap` (opened by a VM) into the peer's namespace: the VM's
    /// frames now reach the peer at 10.0.0.1. A namespace holds one of
    /// them at a time here, so the previous one is removed first.
    fn attach(&self, tap: &str) -> Result<(), String> {
        for old in &self.taps {
            if old != tap {
                let _ = ip(&["-n", &self.ns, "link", "del", old]);
            }
        }
        ip(&["link", "set", "dev", tap, "netns", &self.ns])?;
        ip(&["-n", &self.ns, "addr", "add", "10.0.0.1/24", "dev", tap])?;
        ip(&["-n", &self.ns, "link", "set", tap, "up"])?;
        ip(&["-n", &self.ns, "link", "set", "lo", "up"])
    }
}

/// An echo server inside the namespace, reporting how each connection
/// ended.
fn start_peer(ns: &str, ended: mpsc::Sender<String>) -> Result<(), String> {
    let path = format!("/run/netns/{ns}");
    let (up_tx, up_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let run = || -> std::io::Result<()> {
            let file = std::fs::File::open(&path)?;
            // SAFETY: `file` is an open namespace file; setns changes only
            // this thread's network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let listener = TcpListener::bind((PEER, PORT))?;
            let _ = up_tx.send(Ok(()));
            for stream in listener.incoming() {
                let mut s: TcpStream = stream?;
                let ended = ended.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 256];
                    let how = loop {
                        match s.read(&mut buf) {
                            Ok(0) => break "closed (EOF)".to_string(),
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break "write failed".to_string();
                                }
                            }
                            Err(e) => break format!("{e}"),
                        }
                    };
                    let _ = ended.send(how);
                });
            }
            Ok(())
        };
        if let Err(e) = run() {
            let _ = up_tx.send(Err(e.to_string()));
        }
    });
    up_rx.recv().map_err(|e| e.to_string())?
}

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn identity(host: u8) -> NetIdentity {
    NetIdentity {
        mac: [0x02, 0x5a, 0, 0, 0, host],
        ip: Ipv4Addr::new(10, 0, 0, host),
        prefix_len: 24,
        gateway: PEER,
    }
}

/// Connects, sends `msg`, reads the echo; returns the connection id.
fn talk(vm: &mut VmInstance, msg: &str) -> Result<u32, VmError> {
    let out = vm.invoke("connect", &words(&[u32::from(PEER), u32::from(PORT)]))?;
    let id = u32::from_le_bytes(out[..4].try_into().expect("an id"));
    let mut send = words(&[id]);
    send.extend_from_slice(msg.as_bytes());
    vm.invoke("send", &send)?;
    let echo = vm.invoke("recv", &words(&[id, msg.len() as u32, 5000]))?;
    println!(
        "  guest sent {msg:?}, peer echoed {:?}",
        String::from_utf8_lossy(&echo)
    );
    Ok(id)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("net_recovery needs root (TAP devices and network namespaces); skipping");
        return Ok(());
    }
    let mut lab = Lab {
        ns: format!("snvexample{}", std::process::id()),
        taps: Vec::new(),
    };
    ip(&["netns", "add", &lab.ns])?;
    let (ended_tx, ended) = mpsc::channel();
    start_peer(&lab.ns, ended_tx)?;

    let program =
        GuestProgram::from_file(std::path::Path::new(env!("SNAPVM_GUESTS_DIR")).join("netguest"))?;
    let base = VmConfig::new(program);

    println!("1. boot a VM at 10.0.0.2 and open a connection");
    let tap = lab.tap()?;
    let config = base.clone().network(NetConfig::new(&tap, identity(2)));
    let mut vm = VmInstance::new(&config)?;
    lab.attach(&tap)?;
    let old = talk(&mut vm, "hello before the halt")?;

    println!("2. halt: end the connection on both sides, then snapshot");
    let n = vm.terminate_connections()?;
    println!(
        "  {n} connection(s) terminated; the peer saw: {}",
        ended.recv()?
    );
    let snapshot = vm.snapshot()?;
    drop(vm);

    println!("3. restore into a new VM at 10.0.0.3 (as after a migration)");
    let tap = lab.tap()?;
    let config = base.network(NetConfig::new(&tap, identity(3)));
    let mut copy = VmInstance::restore(&config, &snapshot)?;
    lab.attach(&tap)?;
    match copy.invoke("check", &words(&[old])) {
        Err(VmError::GuestError { code, message }) => {
            println!("  the old stream reports: {message} (code {code})")
        }
        other => println!("  the old stream: {other:?}"),
    }
    println!("4. reconnect");
    talk(&mut copy, "hello after the restore")?;
    Ok(())
}
