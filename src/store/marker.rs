//! The bytes of write leases and sweep markers, and how a reader judges them.
//!
//! Layout (`docs/store-format.md`): 112 bytes, all integers little-endian.
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
//!
//! The older 16-byte form (magic and creation time only) is still read.

use std::sync::OnceLock;
use std::time::Duration;

use super::crypto;

/// Length of a marker this crate writes.
pub(super) const MARKER_LEN: usize = 112;
/// Length of the first marker format (magic and creation time).
const LEGACY_LEN: usize = 16;
/// Markers are read with this bound; anything longer is treated as expired.
pub(super) const MARKER_READ_LIMIT: u64 = 256;
/// How far in the future a marker's creation time may lie (clocks of
/// processes sharing a backend differ a little) before it is suspect.
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
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes a marker of kind `magic`; `None` for anything else (other magic
/// or length), which readers treat as expired.
pub(super) fn decode(bytes: &[u8], magic: [u8; 8]) -> Option<MarkerInfo> {
    if bytes.len() < LEGACY_LEN || bytes[..8] != magic {
        return None;
    }
    let created = u64_at(bytes, 8);
    match bytes.len() {
        LEGACY_LEN => Some(MarkerInfo {
            created,
            ttl: None,
            holder: None,
        }),
        MARKER_LEN => {
            let ttl = Duration::from_millis(u64_at(bytes, 16)).min(MAX_RECORDED_TTL);
            let mut pid = [0u8; 4];
            pid.copy_from_slice(&bytes[24..28]);
            let mut host_id = [0u8; 16];
            host_id.copy_from_slice(&bytes[32..48]);
            let name = &bytes[48..112];
            let name_len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            Some(MarkerInfo {
                created,
                ttl: Some(ttl),
                holder: Some(Holder {
                    pid: u32::from_le_bytes(pid),
                    host_id,
                    host_name: String::from_utf8_lossy(&name[..name_len]).into_owned(),
                }),
            })
        }
        _ => None,
    }
}

/// Whether process `pid` of this PID namespace exists (zombies included).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true; // not a pid we can ask about: assume alive
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists and that we may
    // signal it; nothing is delivered and no memory is passed.
    let ret = unsafe { libc::kill(pid, 0) };
    ret == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

impl Holder {
    /// Whether the holder ran on this host (same name, boot and PID
    /// namespace) and its process is gone. `false` whenever unsure.
    pub(super) fn is_dead(&self) -> bool {
        let (host_id, host_name) = this_host();
        let name_len = host_name.iter().position(|&c| c == 0).unwrap_or(64);
        *host_id != [0; 16]
            && self.host_id == *host_id
            && self.host_name.as_bytes() == &host_name[..name_len]
            && self.pid != 0
            && !pid_alive(self.pid)
    }
}

/// How a reader judges a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Its holder may be working.
    Live,
    /// Past its TTL, unreadable, or its holder is provably dead.
    Expired,
    /// Dated more than [`CLOCK_SKEW_ALLOWANCE`] after `now`: by this much.
    Future(Duration),
}

/// Judges a marker at `now_ms` with the reader's `ttl` (the holder's
/// recorded TTL, when longer, wins: it renews at that pace).
pub(super) fn judge(info: Option<&MarkerInfo>, now_ms: u64, ttl: Duration) -> Verdict {
    let Some(info) = info else {
        return Verdict::Expired;
    };
    if info.holder.as_ref().is_some_and(Holder::is_dead) {
        return Verdict::Expired;
    }
    let skew = CLOCK_SKEW_ALLOWANCE.as_millis() as u64;
    if info.created > now_ms.saturating_add(skew) {
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
    fn round_trip_and_legacy() {
        let b = encode(MAGIC, 1234, HOUR);
        let info = decode(&b, MAGIC).unwrap();
        assert_eq!(info.created, 1234);
        assert_eq!(info.ttl, Some(HOUR));
        let holder = info.holder.unwrap();
        assert_eq!(holder.pid, std::process::id());
        assert!(!holder.is_dead());
        assert_eq!(decode(&b, *b"SNAPVMLS"), None);
        assert_eq!(decode(&b[..100], MAGIC), None);
        let legacy = decode(&b[..16], MAGIC).unwrap();
        assert_eq!((legacy.ttl, legacy.holder), (None, None));
    }

    #[test]
    fn verdicts() {
        let now = 10 * 3600 * 1000;
        let at = |t: u64| decode(&encode(MAGIC, t, Duration::from_secs(1)), MAGIC);
        assert_eq!(judge(at(now).as_ref(), now, HOUR), Verdict::Live);
        assert_eq!(
            judge(at(now - 2 * 3600 * 1000).as_ref(), now, HOUR),
            Verdict::Expired
        );
        // Within the skew allowance: live; beyond: suspect.
        assert_eq!(judge(at(now + 30_000).as_ref(), now, HOUR), Verdict::Live);
        assert_eq!(
            judge(at(now + HOUR.as_millis() as u64).as_ref(), now, HOUR),
            Verdict::Future(HOUR)
        );
        assert_eq!(judge(None, now, HOUR), Verdict::Expired);
        // A dead holder on this host: expired at once, whatever the date.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let mut b = encode(MAGIC, now + HOUR.as_millis() as u64, HOUR);
        b[24..28].copy_from_slice(&pid.to_le_bytes());
        assert_eq!(
            judge(decode(&b, MAGIC).as_ref(), now, HOUR),
            Verdict::Expired
        );
        // Another host with that pid: not ours to judge.
        b[40] ^= 1;
        assert!(matches!(
            judge(decode(&b, MAGIC).as_ref(), now, HOUR),
            Verdict::Future(_)
        ));
    }
}
