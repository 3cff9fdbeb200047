//! Signals: the do-nothing handler of the timeout signal, the calling
//! thread's signal mask, and asking whether a process exists.

use std::io;

extern "C" fn on_signal(_: libc::c_int) {}

/// Installs a handler that does nothing for `signal`, with `SA_RESTART`
/// (a stray signal never disturbs the host application's system calls; a
/// `KVM_RUN` it lands in returns `EINTR`).
pub(crate) fn install_noop_handler(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: `sigaction` is plain data, valid when zeroed; the handler we
    // install does nothing, so it is async-signal-safe. `action` lives for
    // the calls, and no old action is asked for.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Unblocks `signal` for the calling thread.
pub(crate) fn unblock(signal: libc::c_int) {
    // SAFETY: `set` is plain data, valid when zeroed and then initialised
    // by `sigemptyset`; it lives for the calls, and no old mask is asked for.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// `kill(pid, 0)`: checks that process `pid` exists and that we may signal
/// it, delivering nothing. `Err` carries the reason it failed (`ESRCH`: no
/// such process).
pub(crate) fn probe_process(pid: libc::pid_t) -> io::Result<()> {
    // SAFETY: signal 0 only checks that the process exists and that we may
    // signal it; nothing is delivered and no memory is passed.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
