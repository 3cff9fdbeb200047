//! Per-invoke timeouts without a watchdog thread.
//!
//! Each thread that runs a vCPU gets one POSIX timer (created on first use)
//! that delivers [`timeout_signal`] to that thread alone. Arming it before
//! `KVM_RUN` makes the ioctl return `EINTR` when the deadline passes. After
//! the first expiry the timer keeps firing every [`REFIRE`], so a signal that
//! lands just before the vCPU enters the guest is followed by another one.
//! The signal handler does nothing and is installed with `SA_RESTART`, so a
//! stray signal never disturbs the host application's own system calls.

use std::cell::RefCell;
use std::io;
use std::sync::Once;
use std::time::Duration;

/// Interval of repeated expiries after the first one.
const REFIRE: Duration = Duration::from_millis(5);

/// The real-time signal snapvm uses to interrupt a running vCPU:
/// `SIGRTMIN() + 2`. Host applications must not use it for anything else.
pub fn timeout_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_signal(_: libc::c_int) {}

fn install_handler() -> io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: `sigaction` is zero-initialisable plain data; we install a
        // handler that does nothing (async-signal-safe) for our own signal.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(timeout_signal(), &action, std::ptr::null_mut()) != 0 {
                result = Err(io::Error::last_os_error());
            }
        }
    });
    result
}

/// A POSIX timer that signals the thread that created it.
struct ThreadTimer {
    id: libc::timer_t,
}

impl ThreadTimer {
    fn new() -> io::Result<Self> {
        install_handler()?;
        // SAFETY: plain data structures initialised by zeroing, then filled
        // in; `timer_create` writes the new id into `id` on success. The
        // signal is unblocked for this thread only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, timeout_signal());
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());

            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = timeout_signal();
            event.sigev_notify_thread_id = libc::gettid();
            let mut id: libc::timer_t = std::mem::zeroed();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut id) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { id })
        }
    }

    fn set(&self, first: Duration, interval: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: timespec(interval),
            it_value: timespec(first),
        };
        // SAFETY: `self.id` is a live timer owned by this value.
        if unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` is a live timer owned by this value.
        unsafe {
            libc::timer_delete(self.id);
        }
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    }
}

thread_local! {
    static TIMER: RefCell<Option<ThreadTimer>> = const { RefCell::new(None) };
}

/// Arms this thread's timer to interrupt the vCPU after `after`
/// (a zero duration is rounded up to one nanosecond: zero would disarm).
pub(crate) fn arm(after: Duration) -> io::Result<()> {
    TIMER.with(|cell| {
        let mut timer = cell.borrow_mut();
        if timer.is_none() {
            *timer = Some(ThreadTimer::new()?);
        }
        let first = after.max(Duration::from_nanos(1));
        timer.as_ref().map_or(Ok(()), |t| t.set(first, REFIRE))
    })
}

/// Disarms this thread's timer.
pub(crate) fn disarm() {
    TIMER.with(|cell| {
        if let Some(timer) = cell.borrow().as_ref() {
            let _ = timer.set(Duration::ZERO, Duration::ZERO);
        }
    });
}

/// This thread's timer, armed: disarms it when dropped, on every path out
/// of a run (errors, early returns and panics unwinding through it alike).
pub(crate) struct Armed(());

impl Armed {
    /// Arms the timer (see [`arm`]) and returns the guard.
    pub(crate) fn new(after: Duration) -> io::Result<Self> {
        arm(after)?;
        Ok(Self(()))
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        disarm();
    }
}

/// This thread's timer as an id another thread may arm (see
/// [`super::interrupt`]). Valid while the thread lives: the interrupt code
/// only uses it while the owning thread is inside a run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimerId(libc::timer_t);

// SAFETY: a `timer_t` is a process-wide identifier, usable with
// `timer_settime` from any thread. It is deleted only when its owning
// thread exits; `interrupt::Running` guarantees the owner is inside a run
// (so alive) whenever another thread uses the id.
unsafe impl Send for TimerId {}

impl TimerId {
    /// Makes the timer fire now and then every `interval`, until the
    /// owning thread disarms it.
    pub(crate) fn fire_now(self, interval: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: timespec(interval),
            it_value: timespec(Duration::from_nanos(1)),
        };
        // SAFETY: a live timer (see the `Send` impl); the spec is valid.
        if unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// This thread's timer (created on first use).
pub(crate) fn current() -> io::Result<TimerId> {
    TIMER.with(|cell| {
        let mut timer = cell.borrow_mut();
        if timer.is_none() {
            *timer = Some(ThreadTimer::new()?);
        }
        Ok(TimerId(
            timer.as_ref().map_or(std::ptr::null_mut(), |t| t.id),
        ))
    })
}
