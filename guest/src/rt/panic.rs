//! Panic handling: a guest panic is reported to the host with its message and
//! location, and the guest never runs again until the host restores it.

use core::fmt::{self, Write};
use core::panic::PanicInfo;

use super::GuestCell;

/// Longest panic message passed to the host; longer ones are truncated.
const MESSAGE_CAPACITY: usize = 2048;

struct MessageBuffer {
    bytes: [u8; MESSAGE_CAPACITY],
    len: usize,
}

impl Write for MessageBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MESSAGE_CAPACITY - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// A static buffer, so a panic caused by an exhausted heap can still be reported.
static MESSAGE: GuestCell<MessageBuffer> = GuestCell::new(MessageBuffer {
    bytes: [0; MESSAGE_CAPACITY],
    len: 0,
});

/// Set while a panic is being formatted, so a panic inside a `Display`
/// implementation is reported instead of recursing.
static PANICKING: GuestCell<bool> = GuestCell::new(false);

#[panic_handler]
fn on_panic(info: &PanicInfo<'_>) -> ! {
    // SAFETY: single-threaded guest (see `GuestCell`).
    let nested = unsafe { core::mem::replace(&mut *PANICKING.get(), true) };
    let (file, line, column) = info
        .location()
        .map_or(("", 0, 0), |l| (l.file(), l.line(), l.column()));
    if nested {
        super::report_panic(
            "panicked while formatting a panic message",
            file,
            line,
            column,
        );
    }
    // SAFETY: single-threaded guest, and a panic never returns, so this is the
    // only live reference to the buffer (a nested panic is caught above).
    let buffer = unsafe { &mut *MESSAGE.get() };
    buffer.len = 0;
    let _ = write!(buffer, "{}", info.message());
    let message = core::str::from_utf8(&buffer.bytes[..buffer.len]).unwrap_or("<invalid utf-8>");
    // `alloc`'s allocation-failure handler panics with this message: report
    // it as what it is, so the host can tell out-of-memory from a bug.
    let failed = super::alloc_impl::take_failed_allocation();
    if failed != 0 && message.starts_with("memory allocation of") {
        super::report_out_of_memory(failed);
    }
    super::report_panic(message, file, line, column)
}

/// Never called: guests are built with `panic = "abort"`, but the prebuilt
/// `alloc` still references the unwinding personality routine.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Never called, as [`rust_eh_personality`].
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    super::abort("unwinding is not supported")
}
