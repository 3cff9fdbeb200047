//! The shared ABI page and guest buffers as the host sees them: word
//! access to the page's fields, and the one rule for every buffer a guest
//! names ([`check_user_range`]).

use std::mem::offset_of;

use super::error::{HypercallFault, VmError};
use super::{Extension, Vm};
use crate::abi::{self, AbiPage, ABI_PAGE_ADDR};
use crate::sys::memory::GuestRam;

/// Checks that `[addr, addr + len)` is memory guest code can read and write
/// at CPL3: the user stack and the program area up to the end of guest
/// memory (`size`, scratch disk included). The null guard, the ABI page,
/// the supervisor-only system area and the stack guard are refused, so a
/// guest can never make the host read or write there on its behalf. Empty
/// buffers are accepted anywhere (a guest passes dangling pointers for
/// them); the host touches none of their bytes.
pub(crate) fn check_user_range(size: u64, addr: u64, len: u64) -> Result<(), HypercallFault> {
    if len == 0 {
        return Ok(());
    }
    let inside = addr >= abi::STACK_BOTTOM && addr.checked_add(len).is_some_and(|end| end <= size);
    if inside {
        Ok(())
    } else {
        Err(HypercallFault::NotGuestMemory { addr, len })
    }
}

pub(super) const fn field(offset: usize) -> u64 {
    ABI_PAGE_ADDR + offset as u64
}

pub(super) const ARGS: u64 = field(offset_of!(AbiPage, args));
pub(super) const RET: u64 = field(offset_of!(AbiPage, ret));

/// Reads `N` words of the ABI page at guest address `addr`.
pub(super) fn ram_words<const N: usize>(ram: &GuestRam, addr: u64) -> Result<[u64; N], VmError> {
    let mut bytes = [[0u8; 8]; N];
    ram.read(addr, bytes.as_flattened_mut())
        .map_err(|e| bad("ABI page", e.into()))?;
    Ok(bytes.map(u64::from_le_bytes))
}

/// A finished call as the guest reported it: its heap figures, and its
/// output (address, length) checked, or why it is refused.
#[derive(Debug)]
pub(super) struct CallReport {
    pub(super) heap_used: u64,
    /// `abi::GARBAGE_UNREPORTED` when the guest does not report garbage.
    pub(super) garbage: u64,
    pub(super) output: Result<(u64, u64), VmError>,
}

/// What the host accepts from a guest's result.
#[derive(Clone, Copy, Debug)]
pub(super) struct ResultLimits {
    pub(super) memory_size: u64,
    pub(super) max_output: u64,
    pub(super) message: u64,
}

/// Reads the result of a finished call from the ABI page, each field once,
/// and checks it: the output must lie in user memory and fit the output
/// limit; a guest error becomes [`VmError::GuestError`] with its (bounded)
/// message.
pub(super) fn read_result(ram: &GuestRam, limits: ResultLimits) -> Result<CallReport, VmError> {
    let [output_ptr, output_len, status, heap_used] =
        ram_words::<4>(ram, field(offset_of!(AbiPage, output_ptr)))?;
    let [garbage] = ram_words::<1>(ram, field(offset_of!(AbiPage, garbage)))?;
    let output = check_output(ram, limits, status, output_ptr, output_len);
    Ok(CallReport {
        heap_used,
        garbage,
        output,
    })
}

fn check_output(
    ram: &GuestRam,
    limits: ResultLimits,
    status: u64,
    output_ptr: u64,
    output_len: u64,
) -> Result<(u64, u64), VmError> {
    if status == abi::STATUS_GUEST_ERROR {
        // The function finished and returned an error: the guest is
        // undisturbed, the instance stays ready.
        let [code] = ram_words::<1>(ram, ARGS)?;
        check_user_range(limits.memory_size, output_ptr, output_len).map_err(|e| bad("Done", e))?;
        let len = output_len.min(limits.message);
        let message = read_str(ram, output_ptr, len, len, true).map_err(|e| bad("Done", e))?;
        return Err(match code as u32 {
            abi::ERROR_BAD_INPUT => VmError::InputRejected { message },
            code => VmError::GuestError { code, message },
        });
    }
    if status != abi::STATUS_OK {
        return Err(bad("Done", HypercallFault::BadStatus(status)));
    }
    check_user_range(limits.memory_size, output_ptr, output_len).map_err(|e| bad("Done", e))?;
    if output_len > limits.max_output {
        return Err(VmError::OutputTooLarge {
            len: output_len,
            limit: limits.max_output,
        });
    }
    Ok((output_ptr, output_len))
}

impl<X: Extension, D> Vm<X, D> {
    /// Reads `N` words of the ABI page at guest address `addr`.
    pub(super) fn read_words<const N: usize>(&self, addr: u64) -> Result<[u64; N], VmError> {
        ram_words(self.machine.ram(), addr)
    }

    /// What this VM accepts from a guest's result.
    pub(super) fn result_limits(&self) -> ResultLimits {
        ResultLimits {
            memory_size: self.memory_size(),
            max_output: self.max_output,
            message: self.limits.message,
        }
    }

    /// Writes `words` to the ABI page at guest address `addr`.
    pub(super) fn write_words(&self, addr: u64, words: &[u64]) -> Result<(), VmError> {
        let mut bytes = [0u8; 8 * 32];
        let len = words.len() * 8;
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        self.machine
            .ram()
            .write(addr, &bytes[..len])
            .map_err(|e| bad("ABI page", e.into()))
    }
}

/// The boot fields of the ABI page, in order from its start.
pub(super) fn abi_boot_words(boot: &AbiPage) -> [u64; 5] {
    [
        boot.magic,
        u64::from(boot.version),
        boot.mem_size,
        boot.heap_start,
        boot.heap_end,
    ]
}

pub(super) fn bad(hypercall: &'static str, reason: HypercallFault) -> VmError {
    VmError::BadHypercall { hypercall, reason }
}

/// Reads a guest string of `len` bytes (at most `limit`). With `lossy`,
/// invalid UTF-8 is replaced rather than rejected.
pub(super) fn read_str(
    ram: &GuestRam,
    ptr: u64,
    len: u64,
    limit: u64,
    lossy: bool,
) -> Result<String, HypercallFault> {
    if len > limit {
        return Err(HypercallFault::TooLong { len, limit });
    }
    check_user_range(ram.size(), ptr, len)?;
    let bytes = ram.read_vec(ptr, len)?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) if lossy => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        Err(_) => Err(HypercallFault::NotUtf8),
    }
}

/// The [`AbiPage::log_level`] word for the host's logger now: the most
/// verbose level enabled for target `snapvm::guest`, marked as set. Cheap
/// when logging is off (each check reads `log`'s static maximum first).
pub(super) fn guest_log_level() -> u64 {
    const LEVELS: [(log::Level, u64); 5] = [
        (log::Level::Trace, 5),
        (log::Level::Debug, 4),
        (log::Level::Info, 3),
        (log::Level::Warn, 2),
        (log::Level::Error, 1),
    ];
    let max = LEVELS
        .iter()
        .find(|(level, _)| log::log_enabled!(target: "snapvm::guest", *level))
        .map_or(0, |&(_, n)| n);
    abi::LOG_LEVEL_SET | max
}
