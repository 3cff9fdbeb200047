//! A guest without the runtime that executes a *script* of raw ABI actions
//! taken from its scratch disk: it writes whatever it is told into the ABI
//! page or memory, makes any hypercall, and executes the I/O and privileged
//! instructions a hostile guest could. The hostile-guest tests and the
//! hypercall fuzz target drive the host with it.
//!
//! The script is a sequence of little-endian `u64` words at the start of the
//! scratch disk; each operation is an opcode followed by its operands:
//!
//! | op | operands      | action                                                |
//! |----|---------------|-------------------------------------------------------|
//! | 0  |               | stop: answer every later request with `Done`          |
//! | 1  | offset, value | write `value` at ABI page + `offset` (mod 4 KiB, aligned) |
//! | 2  | addr, value   | write `value` at guest address `addr`                 |
//! | 3  | nr            | `out` hypercall `nr` (32-bit, the normal way)         |
//! | 4  |               | `in eax, dx` from the hypercall port                  |
//! | 5  | count         | `rep insb` from the hypercall port, `count` bytes     |
//! | 6  | value         | `outsd` of one dword `value` to the hypercall port    |
//! | 7  | count, value  | `rep outsd` of `count` dwords `value`                 |
//! | 8  | kind          | a privileged instruction (see [`privileged`])         |
//! | 9  | target        | continue at word `target` of the script               |
//! | 10 | offset, add   | write disk address + `add` at ABI page + `offset`     |
//! | 11 | n, t0 .. tn-1 | continue at word `t[func_index]` (stop if out of range) |
//!
//! Any other opcode, or running off the end of the disk, stops the script.
#![no_std]
#![no_main]

use core::arch::asm;

use snapvm_abi as abi;

use abi::{AbiPage, ABI_PAGE_ADDR, PORT_HYPERCALL};

/// A scratch area for string I/O, in the disk above the script.
const SCRATCH_OFFSET: u64 = 0x8000;

fn abi_word(offset: u64) -> *mut u64 {
    (ABI_PAGE_ADDR + ((offset % abi::PAGE_SIZE) & !7)) as *mut u64
}

fn read_abi(offset: usize) -> u64 {
    // SAFETY: the ABI page is mapped read/write at CPL3; aligned offset.
    unsafe {
        (ABI_PAGE_ADDR as *const u8)
            .add(offset)
            .cast::<u64>()
            .read_volatile()
    }
}

fn hypercall(nr: u32) {
    // SAFETY: an exit to the host on the hypercall port.
    unsafe { asm!("out dx, eax", in("dx") PORT_HYPERCALL, in("eax") nr) };
}

/// Executes privileged instruction `kind`; each faults at CPL3.
fn privileged(kind: u64) {
    // SAFETY: each instruction raises #GP (or #UD) at CPL3; the fault ends
    // the call. Nothing here runs to completion in a correctly isolated VM.
    unsafe {
        match kind {
            0 => asm!("wrmsr", in("ecx") 0xC000_0082u32, in("eax") 0x5000u32, in("edx") 0u32),
            1 => asm!("mov dr7, {}", in(reg) 0x401u64),
            2 => asm!("xsetbv", in("ecx") 0u32, in("eax") 1u32, in("edx") 0u32),
            3 => asm!("mov cr3, {}", in(reg) 0xA000u64),
            4 => asm!("hlt"),
            5 => asm!("lidt [{}]", in(reg) 0x20_0000u64),
            6 => asm!("swapgs"),
            _ => asm!("cli"),
        }
    }
}

#[no_mangle]
extern "C" fn _start() -> ! {
    let disk = read_abi(core::mem::offset_of!(AbiPage, disk_addr));
    let disk_size = read_abi(core::mem::offset_of!(AbiPage, disk_size));
    let words = disk_size / 8;
    let word = |i: u64| -> Option<u64> {
        // SAFETY: `i` is below the disk's word count; the disk is mapped
        // read/write at CPL3 and 8-byte aligned.
        (i < words).then(|| unsafe { ((disk + i * 8) as *const u64).read_volatile() })
    };
    let scratch = disk + SCRATCH_OFFSET;
    let mut ip = 0u64;
    while let Some(op) = word(ip) {
        let a = word(ip + 1).unwrap_or(0);
        let b = word(ip + 2).unwrap_or(0);
        ip += 1;
        match op {
            1 => {
                // SAFETY: inside the ABI page, aligned (see `abi_word`).
                unsafe { abi_word(a).write_volatile(b) };
                ip += 2;
            }
            2 => {
                // SAFETY: deliberately unchecked: a bad address faults,
                // which the host reports as a guest fault.
                unsafe { (a as *mut u64).write_unaligned(b) };
                ip += 2;
            }
            3 => {
                hypercall(a as u32);
                ip += 1;
            }
            4 => {
                // SAFETY: a port read the host does not serve; it ends the call.
                unsafe { asm!("in eax, dx", in("dx") PORT_HYPERCALL, out("eax") _) };
            }
            5 => {
                // SAFETY: writes at most `a` bytes into the scratch area of
                // the disk (bounded to its size below).
                unsafe {
                    asm!("rep insb", in("dx") PORT_HYPERCALL,
                        inout("rdi") scratch => _, inout("rcx") a.min(disk_size.saturating_sub(SCRATCH_OFFSET)) => _)
                };
                ip += 1;
            }
            6 => {
                // SAFETY: reads one dword from the scratch area.
                unsafe {
                    (scratch as *mut u32).write_volatile(a as u32);
                    asm!("outsd", in("dx") PORT_HYPERCALL, inout("rsi") scratch => _);
                }
                ip += 1;
            }
            7 => {
                let count = a.min(1024);
                for i in 0..count {
                    // SAFETY: 4 KiB of the scratch area, inside the disk.
                    unsafe { ((scratch + i * 4) as *mut u32).write_volatile(b as u32) };
                }
                // SAFETY: reads `count` dwords from the scratch area.
                unsafe {
                    asm!("rep outsd", in("dx") PORT_HYPERCALL,
                        inout("rsi") scratch => _, inout("rcx") count => _)
                };
                ip += 2;
            }
            8 => {
                privileged(a);
                ip += 1;
            }
            9 => ip = a,
            11 => {
                let index = read_abi(core::mem::offset_of!(AbiPage, func_index));
                match (index < a).then(|| word(ip + 1 + index)).flatten() {
                    Some(target) => ip = target,
                    None => break,
                }
            }
            10 => {
                // SAFETY: inside the ABI page, aligned (see `abi_word`).
                unsafe { abi_word(a).write_volatile(disk.wrapping_add(b)) };
                ip += 2;
            }
            _ => break,
        }
    }
    loop {
        hypercall(abi::Hypercall::Done as u32);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        // SAFETY: `ud2` raises #UD, which the host reports as a guest fault.
        unsafe { asm!("ud2") };
    }
}
