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
use std::sync::{Arc, Once};
use std::time::Duration;

use crate::sys::signal;
use crate::sys::timer::ThreadTimer;

/// Interval of repeated expiries after the first one.
const REFIRE: Duration = Duration::from_millis(5);

/// The real-time signal snapvm uses to interrupt a running vCPU:
/// `SIGRTMIN() + 2`. Host applications must not use it for anything else.
pub fn timeout_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

fn install_handler() -> io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = signal::install_noop_handler(timeout_signal()));
    result
}

/// A new timer that signals this thread with [`timeout_signal`].
fn new_timer() -> io::Result<TimerId> {
    install_handler()?;
    ThreadTimer::new(timeout_signal()).map(|t| TimerId(Arc::new(t)))
}

thread_local! {
    static TIMER: RefCell<Option<TimerId>> = const { RefCell::new(None) };
}

/// Arms this thread's timer to interrupt the vCPU after `after`
/// (a zero duration is rounded up to one nanosecond: zero would disarm).
pub(crate) fn arm(after: Duration) -> io::Result<()> {
    TIMER.with(|cell| {
        let mut timer = cell.borrow_mut();
        if timer.is_none() {
            *timer = Some(new_timer()?);
        }
        let first = after.max(Duration::from_nanos(1));
        timer.as_ref().map_or(Ok(()), |t| t.0.set(first, REFIRE))
    })
}

/// Disarms this thread's timer.
pub(crate) fn disarm() {
    TIMER.with(|cell| {
        if let Some(timer) = cell.borrow().as_ref() {
            let _ = timer.0.set(Duration::ZERO, Duration::ZERO);
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

/// This thread's timer as a handle another thread may fire (see
/// [`super::interrupt`]). The timer lives as long as any handle to it.
#[derive(Clone, Debug)]
pub(crate) struct TimerId(Arc<ThreadTimer>);

impl TimerId {
    /// Makes the timer fire now and then every `interval`, until the
    /// owning thread disarms it.
    pub(crate) fn fire_now(&self, interval: Duration) -> io::Result<()> {
        self.0.set(Duration::from_nanos(1), interval)
    }

    /// Whether both are handles to the same timer.
    pub(crate) fn same(&self, other: &TimerId) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Calls `f` with this thread's timer (created on first use).
pub(crate) fn with_current<R>(f: impl FnOnce(&TimerId) -> R) -> io::Result<R> {
    TIMER.with(|cell| {
        let mut timer = cell.borrow_mut();
        let timer = match timer.as_ref() {
            Some(t) => t,
            None => timer.insert(new_timer()?),
        };
        Ok(f(timer))
    })
}
