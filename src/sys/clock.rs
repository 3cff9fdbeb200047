//! Clocks: the monotonic clock, the calling thread's CPU time and the
//! time-stamp counter.

use std::io;
use std::time::Duration;

fn clock_gettime(clock: libc::clockid_t) -> io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that lives for the call;
    // the kernel writes nothing else.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The monotonic clock (`CLOCK_MONOTONIC`), since an unspecified start.
pub(crate) fn monotonic() -> Duration {
    // CLOCK_MONOTONIC exists on every Linux: this cannot fail.
    clock_gettime(libc::CLOCK_MONOTONIC).unwrap_or_default()
}

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
pub(crate) fn thread_cpu_time() -> io::Result<Duration> {
    clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Reads the time-stamp counter.
pub(crate) fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` reads the time-stamp counter into edx:eax; it touches
    // no memory and is allowed in user mode on Linux.
    unsafe {
        std::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}
