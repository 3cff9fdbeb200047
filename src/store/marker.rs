//! The bytes of write leases and sweep markers, and how a reader judges them.
//!
//! Layout (`docs/store-format.md`): 136 bytes, all integers little-endian.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic (`SNAPVMLS` or `SNAPVMSW`) |
//! | 8 | 8 | creation time, ms since the Unix epoch (writer's clock) |
//! | 16 | 8 | the holder's lease TTL in ms |
//! | 24 | 4 | the holder's process id (0: unknown) |
//! | 28 | 4 | zero |
//! | 32 | 16 | host instance id (zero: unknown) |
//! | 48 | 64 | host name, zero-padded |
//! | 112 | 8 | the holder's process start time, clock ticks since boot (0: unknown) |
//! | 120 | 16 | the holder's writer id: random, drawn once per process |
//!
//! The older 16-byte (magic and creation time) and 112-byte (without the
//! last two fields) forms are still read.

use std::sync::OnceLock;
use std::time::Duration;

use super::crypto;

/// Length of a marker this crate writes.
pub(super) const MARKER_LEN: usize = 136;
/// Length of the first marker format (magic and creation time).
const LEGACY_LEN: usize = 16;
/// Length of the second format (no process start time, no writer id).
const V2_LEN: usize = 112;
/// Markers are read with this bound; anything longer cannot be interpreted.
pub(super) const MARKER_READ_LIMIT: u64 = 256;
/// How far in the future a marker's creation time may lie (clocks of
/// processes sharing a backend differ a little). A marker dated further
/// ahead, whose writer is not a running process of this host, is treated
/// as expired: its date cannot be trusted, and it must not hold puts or
/// garbage collection back until that date.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);
/// A recorded holder TTL above this is capped, so a damaged or hostile
/// marker cannot count as live for years.
const MAX_RECORDED_TTL: Duration = Duration::from_secs(24 * 3600);
const HOST_ID_DOMAIN: &[u8] = b"snapvm-store-v1 host\0";

/// Who wrote a marker: enough to tell, on the same host, whether it is
/// still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Holder {
    pub pid: u32,
    pub host_id: [u8; 16],
    pub host_name: String,
    /// The process's start time in clock ticks since boot (0: unknown), so
    /// that a reused pid is not taken for the writer.
    pub start_time: u64,
    /// Random, drawn once per process (zero: not recorded).
    pub writer_id: [u8; 16],
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}", self.pid, self.host_name)?;
        if self.writer_id != [0; 16] {
            f.write_str(" (writer ")?;
            for b in &self.writer_id[..4] {
                write!(f, "{b:02x}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A decoded marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MarkerInfo {
    /// Creation time, ms since the Unix epoch.
    pub created: u64,
    /// The holder's lease TTL (capped), when recorded.
    pub ttl: Option<Duration>,
    /// The holder, when recorded.
    pub holder: Option<Holder>,
}

/// This host: its name (`/proc/sys/kernel/hostname`) and an id that also
/// separates boots and PID namespaces (two containers with one host name
/// must not judge each other's process ids). Zero id when unknown.
fn this_host() -> &'static ([u8; 16], [u8; 64]) {
    static HOST: OnceLock<([u8; 16], [u8; 64])> = OnceLock::new();
    HOST.get_or_init(|| {
        let mut name = [0u8; 64];
        if let Ok(n) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let n = n.trim_end().as_bytes();
            let len = n.len().min(64);
            name[..len].copy_from_slice(&n[..len]);
        }
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id");
        let pid_ns = std::fs::read_link("/proc/self/ns/pid");
        let id = match (boot, pid_ns) {
            (Ok(boot), Ok(ns)) => {
                let mut buf = HOST_ID_DOMAIN.to_vec();
                buf.extend_from_slice(boot.trim().as_bytes());
                buf.push(0);
                buf.extend_from_slice(ns.as_os_str().as_encoded_bytes());
                let h = crypto::sha256(&buf);
                let mut id = [0u8; 16];
                id.copy_from_slice(&h[..16]);
                id
            }
            _ => [0; 16],
        };
        (id, name)
    })
}

/// Start time of process `pid` of this PID namespace, in clock ticks since
/// boot (field 22 of `/proc/<pid>/stat`); `None` when it cannot be read.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// This process's writer id and start time.
fn this_writer() -> &'static ([u8; 16], u64) {
    static WRITER: OnceLock<([u8; 16], u64)> = OnceLock::new();
    WRITER.get_or_init(|| {
        let mut id = [0u8; 16];
        // Zero (not recorded) if the system has no randomness; the marker
        // name itself is random and fails the write first in that case.
        let _ = getrandom::fill(&mut id);
        (id, start_time(std::process::id()).unwrap_or(0))
    })
}

/// This process as a marker records it.
#[cfg(test)]
pub(super) fn this_holder() -> Holder {
    let (host_id, host_name) = this_host();
    let (writer_id, start_time) = this_writer();
    let name_len = host_name.iter().position(|&c| c == 0).unwrap_or(64);
    Holder {
        pid: std::process::id(),
        host_id: *host_id,
        host_name: String::from_utf8_lossy(&host_name[..name_len]).into_owned(),
        start_time: *start_time,
        writer_id: *writer_id,
    }
}

/// The bytes of a new marker created at `now_ms` by this process.
pub(super) fn encode(magic: [u8; 8], now_ms: u64, ttl: Duration) -> [u8; MARKER_LEN] {
    let (host_id, host_name) = this_host();
    let mut b = [0u8; MARKER_LEN];
    b[..8].copy_from_slice(&magic);
    b[8..16].copy_from_slice(&now_ms.to_le_bytes());
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    b[16..24].copy_from_slice(&ttl_ms.to_le_bytes());
    b[24..28].copy_from_slice(&std::process::id().to_le_bytes());
    b[32..48].copy_from_slice(host_id);
    b[48..112].copy_from_slice(host_name);
    let (writer_id, start_time) = this_writer();
    b[112..120].copy_from_slice(&start_time.to_le_bytes());
    b[120..136].copy_from_slice(writer_id);
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Why an object in a marker namespace cannot be interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unreadable {
    /// Another magic: not a marker of this kind.
    Magic,
    /// A length no format of this crate has (a newer format, or damage).
    Length(u64),
    /// Not a regular file (file-system backend).
    NotAFile,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::Magic => f.write_str("unknown magic"),
            Unreadable::Length(len) => write!(f, "unknown length {len}"),
            Unreadable::NotAFile => f.write_str("not a regular file"),
        }
    }
}

/// Decodes a marker of kind `magic`.
pub(super) fn decode(bytes: &[u8], magic: [u8; 8]) -> Result<MarkerInfo, Unreadable> {
    if !matches!(bytes.len(), LEGACY_LEN | V2_LEN | MARKER_LEN) {
        return Err(Unreadable::Length(bytes.len() as u64));
    }
    if bytes[..8] != magic {
        return Err(Unreadable::Magic);
    }
    let created = u64_at(bytes, 8);
    if bytes.len() == LEGACY_LEN {
        return Ok(MarkerInfo {
            created,
            ttl: None,
            holder: None,
        });
    }
    let ttl = Duration::from_millis(u64_at(bytes, 16)).min(MAX_RECORDED_TTL);
    let mut pid = [0u8; 4];
    pid.copy_from_slice(&bytes[24..28]);
    let mut host_id = [0u8; 16];
    host_id.copy_from_slice(&bytes[32..48]);
    let name = &bytes[48..112];
    let name_len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    let (start_time, writer_id) = if bytes.len() == MARKER_LEN {
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[120..136]);
        (u64_at(bytes, 112), id)
    } else {
        (0, [0; 16])
    };
    Ok(MarkerInfo {
        created,
        ttl: Some(ttl),
        holder: Some(Holder {
            pid: u32::from_le_bytes(pid),
            host_id,
            host_name: String::from_utf8_lossy(&name[..name_len]).into_owned(),
            start_time,
            writer_id,
        }),
    })
}

/// Whether process `pid` of this PID namespace exists (zombies included).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true; // not a pid we can ask about: assume alive
    };
    if pid <= 0 {
        return true;
    }
    crate::sys::signal::probe_process(pid)
        .map_or_else(|e| e.raw_os_error() != Some(libc::ESRCH), |()| true)
}

impl Holder {
    /// Whether the holder ran on this host (same name, boot and PID
    /// namespace).
    fn is_this_host(&self) -> bool {
        let (host_id, host_name) = this_host();
        let name_len = host_name.iter().position(|&c| c == 0).unwrap_or(64);
        *host_id != [0; 16]
            && self.host_id == *host_id
            && self.host_name.as_bytes() == &host_name[..name_len]
            && self.pid != 0
    }

    /// Whether the holder ran on this host and its process is gone: no
    /// process has its pid, or the one that has started at another time
    /// (the pid was reused). `false` whenever unsure.
    pub(super) fn is_dead(&self) -> bool {
        if !self.is_this_host() {
            return false;
        }
        if !pid_alive(self.pid) {
            return true;
        }
        self.start_time != 0 && start_time(self.pid).is_some_and(|t| t != self.start_time)
    }

    /// Whether the holder is a running process of this host (its pid is
    /// alive and, when recorded, started when the marker says).
    fn is_running_here(&self) -> bool {
        self.is_this_host()
            && pid_alive(self.pid)
            && (self.start_time == 0 || start_time(self.pid) == Some(self.start_time))
    }
}

/// How a reader judges a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Its holder may be working.
    Live,
    /// Past its TTL, or its holder is provably dead.
    Expired,
    /// Dated more than [`CLOCK_SKEW_ALLOWANCE`] after `now` (by this much),
    /// by a holder that is not a running process of this host: its date
    /// cannot be trusted, and readers treat it as expired (and say so).
    Future(Duration),
    /// Not a marker this crate can interpret.
    Unreadable(Unreadable),
}

/// Judges a marker at `now_ms` with the reader's `ttl` (the holder's
/// recorded TTL, when longer, wins: it renews at that pace).
pub(super) fn judge(info: Result<&MarkerInfo, Unreadable>, now_ms: u64, ttl: Duration) -> Verdict {
    let info = match info {
        Ok(info) => info,
        Err(why) => return Verdict::Unreadable(why),
    };
    if info.holder.as_ref().is_some_and(Holder::is_dead) {
        return Verdict::Expired;
    }
    let skew = CLOCK_SKEW_ALLOWANCE.as_millis() as u64;
    if info.created > now_ms.saturating_add(skew) {
        // A running process of this host shares our clock: its date is
        // wrong but it is really there, so it is respected (a put waits
        // for it at most `lease_ttl`, as for any sweep).
        if info.holder.as_ref().is_some_and(Holder::is_running_here) {
            return Verdict::Live;
        }
        return Verdict::Future(Duration::from_millis(info.created - now_ms));
    }
    let ttl = info.ttl.map_or(ttl, |t| t.max(ttl));
    if (now_ms.saturating_sub(info.created) as u128) < ttl.as_millis() {
        Verdict::Live
    } else {
        Verdict::Expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: [u8; 8] = *b"SNAPVMSW";
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn round_trip_and_older_forms() {
        let b = encode(MAGIC, 1234, HOUR);
        let info = decode(&b, MAGIC).unwrap();
        assert_eq!(info.created, 1234);
        assert_eq!(info.ttl, Some(HOUR));
        let holder = info.holder.unwrap();
        assert_eq!(holder, this_holder());
        assert_eq!(holder.pid, std::process::id());
        assert_ne!(holder.start_time, 0);
        assert_ne!(holder.writer_id, [0; 16]);
        assert!(!holder.is_dead());
        assert!(holder.is_running_here());
        assert_eq!(decode(&b, *b"SNAPVMLS"), Err(Unreadable::Magic));
        assert_eq!(decode(&b[..100], MAGIC), Err(Unreadable::Length(100)));
        let v2 = decode(&b[..112], MAGIC).unwrap().holder.unwrap();
        assert_eq!((v2.pid, v2.start_time), (std::process::id(), 0));
        let legacy = decode(&b[..16], MAGIC).unwrap();
        assert_eq!((legacy.ttl, legacy.holder), (None, None));
    }

    #[test]
    fn verdicts() {
        let now = 10 * 3600 * 1000;
        let at = |t: u64| decode(&encode(MAGIC, t, Duration::from_secs(1)), MAGIC);
        assert_eq!(
            judge(at(now).as_ref().map_err(|e| *e), now, HOUR),
            Verdict::Live
        );
        assert_eq!(
            judge(
                at(now - 2 * 3600 * 1000).as_ref().map_err(|e| *e),
                now,
                HOUR
            ),
            Verdict::Expired
        );
        assert_eq!(
            judge(Err(Unreadable::Magic), now, HOUR),
            Verdict::Unreadable(Unreadable::Magic)
        );
        // Far in the future but written by this (running) process: live.
        let ahead = now + HOUR.as_millis() as u64;
        assert_eq!(
            judge(at(ahead).as_ref().map_err(|e| *e), now, HOUR),
            Verdict::Live
        );
        // The same from another host: within the allowance live, beyond it
        // untrusted.
        let mut b = encode(MAGIC, now + 30_000, HOUR);
        b[40] ^= 1;
        assert_eq!(
            judge(decode(&b, MAGIC).as_ref().map_err(|e| *e), now, HOUR),
            Verdict::Live
        );
        b[8..16].copy_from_slice(&ahead.to_le_bytes());
        assert_eq!(
            judge(decode(&b, MAGIC).as_ref().map_err(|e| *e), now, HOUR),
            Verdict::Future(HOUR)
        );
        // A dead holder on this host: expired at once, whatever the date.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let mut b = encode(MAGIC, ahead, HOUR);
        b[24..28].copy_from_slice(&pid.to_le_bytes());
        assert_eq!(
            judge(decode(&b, MAGIC).as_ref().map_err(|e| *e), now, HOUR),
            Verdict::Expired
        );
        // A live pid that started at another time: the pid was reused.
        let mut b = encode(MAGIC, now, HOUR);
        let start = this_holder().start_time;
        b[112..120].copy_from_slice(&(start + 1).to_le_bytes());
        assert_eq!(
            judge(decode(&b, MAGIC).as_ref().map_err(|e| *e), now, HOUR),
            Verdict::Expired
        );
    }
}
