//! POSIX timers that signal the thread that created them (the per-thread
//! timeout timer, see `vm::timer`), deleted on drop.

use std::io;
use std::time::Duration;

use super::signal;

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    }
}

/// A POSIX timer on the monotonic clock that delivers a signal to the
/// thread that created it. Deleted on drop. Any thread may set it (an
/// `Arc<ThreadTimer>` is how another thread kicks the owner).
#[derive(Debug)]
pub(crate) struct ThreadTimer {
    id: libc::timer_t,
}

// SAFETY: `id` names a timer of the process, live as long as this value;
// `timer_settime` and `timer_delete` work on it from any thread (the
// signal still goes to the thread that created it), and the C library
// state behind the id (if any) is the library's own, not this thread's.
unsafe impl Send for ThreadTimer {}
// SAFETY: the only `&self` method, `set`, is one `timer_settime` call,
// which the kernel serialises with any other on the same timer.
unsafe impl Sync for ThreadTimer {}

impl ThreadTimer {
    /// A timer that sends `signal` to the calling thread, for which the
    /// signal is unblocked. Install a handler for it first.
    pub(crate) fn new(signal: libc::c_int) -> io::Result<Self> {
        signal::unblock(signal);
        // SAFETY: `sigevent` and `timer_t` are plain data, valid when
        // zeroed; `event` is then filled in and only read by the call,
        // which writes the new timer's id into `id` on success.
        unsafe {
            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = signal;
            event.sigev_notify_thread_id = libc::gettid();
            let mut id: libc::timer_t = std::mem::zeroed();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut id) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { id })
        }
    }

    /// Fires first after `first` (zero disarms), then every `interval`
    /// (zero: once).
    pub(crate) fn set(&self, first: Duration, interval: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: timespec(interval),
            it_value: timespec(first),
        };
        // SAFETY: `self.id` is a live timer owned by this value; `spec` is
        // valid and lives for the call, and no old value is asked for.
        if unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` is a live timer owned by this value, deleted
        // once, here.
        unsafe {
            libc::timer_delete(self.id);
        }
    }
}
