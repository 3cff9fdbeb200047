//! A guest that misbehaves on request: the integration tests use it to check
//! that every kind of guest failure reaches the host as a typed error, and
//! that well-behaved calls (large buffers, host calls, SSE/AVX) work.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;
use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

use snapvm_guest::abi::{self, AbiPage, Hypercall};
use snapvm_guest::Exports;

snapvm_guest::entry!(init);

fn init(exports: &mut Exports) {
    exports
        .export("empty", |_| Vec::new())
        .export("echo", |input| input.to_vec())
        .export("counter", counter)
        .export("panic", |_| panic!("boom {}", 42))
        .export("abort", |_| snapvm_guest::abort("refusing this input"))
        .export("null_deref", null_deref)
        .export("div_zero", div_zero)
        .export("stack_overflow", stack_overflow)
        .export("invalid_opcode", invalid_opcode)
        .export("bad_port", bad_port)
        .export("privileged", privileged)
        .export("infinite_loop", infinite_loop)
        .export("write_system_area", write_system_area)
        .export("bad_log_pointer", bad_log_pointer)
        .export("overflowing_length", overflowing_length)
        .export("unknown_hypercall", unknown_hypercall)
        .export("output_outside_memory", output_outside_memory)
        .export("output_of_size", output_of_size)
        .export("alloc_mib", alloc_mib)
        .export("log", log)
        .export("host_call", host_call)
        .export("sse_avx", sse_avx);
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Increments a global and returns it: state survives between calls.
fn counter(_: &[u8]) -> Vec<u8> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    n.to_le_bytes().to_vec()
}

fn null_deref(_: &[u8]) -> Vec<u8> {
    // SAFETY: deliberately faulting: address 0 is the unmapped guard page.
    let byte = unsafe { core::ptr::read_volatile(black_box(0usize) as *const u8) };
    vec![byte]
}

fn div_zero(_: &[u8]) -> Vec<u8> {
    // SAFETY: deliberately raises #DE; touches no memory.
    unsafe {
        asm!("xor edx, edx", "xor ecx, ecx", "mov eax, 1", "div ecx", out("eax") _, out("ecx") _, out("edx") _)
    };
    Vec::new()
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let buffer = black_box([depth; 512]);
    if black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + buffer[(depth % 512) as usize]
}

fn stack_overflow(_: &[u8]) -> Vec<u8> {
    recurse(0).to_le_bytes().to_vec()
}

fn invalid_opcode(_: &[u8]) -> Vec<u8> {
    // SAFETY: deliberately raises #UD.
    unsafe { asm!("ud2") };
    Vec::new()
}

fn bad_port(_: &[u8]) -> Vec<u8> {
    // SAFETY: port 0x80 is not in the I/O bitmap: raises #GP at CPL3.
    unsafe { asm!("out 0x80, al", in("al") 0u8) };
    Vec::new()
}

fn privileged(_: &[u8]) -> Vec<u8> {
    // SAFETY: `cli` at CPL3 raises #GP; the guest cannot disable interrupts.
    unsafe { asm!("cli") };
    Vec::new()
}

fn infinite_loop(_: &[u8]) -> Vec<u8> {
    loop {
        core::hint::spin_loop();
    }
}

/// Tries to overwrite the GDT in the supervisor-only system area.
fn write_system_area(_: &[u8]) -> Vec<u8> {
    // SAFETY: deliberately faulting: the system area is supervisor-only.
    unsafe { core::ptr::write_volatile(abi::SYSTEM_AREA_START as *mut u64, 0) };
    Vec::new()
}

fn raw_hypercall(nr: u32, args: &[u64]) {
    let page = abi::ABI_PAGE_ADDR as *mut AbiPage;
    for (i, arg) in args.iter().enumerate() {
        // SAFETY: the ABI page is mapped read/write at CPL3.
        unsafe { core::ptr::addr_of_mut!((*page).args[i]).write_volatile(*arg) };
    }
    // SAFETY: an exit to the host on the hypercall port.
    unsafe { asm!("out dx, eax", in("dx") abi::PORT_HYPERCALL, in("eax") nr) };
}

fn mem_size() -> u64 {
    let page = abi::ABI_PAGE_ADDR as *const AbiPage;
    // SAFETY: the ABI page is mapped read/write at CPL3.
    unsafe { core::ptr::addr_of!((*page).mem_size).read_volatile() }
}

/// A log hypercall whose buffer runs past the end of guest memory.
fn bad_log_pointer(_: &[u8]) -> Vec<u8> {
    raw_hypercall(Hypercall::Log as u32, &[3, mem_size() - 16, 64]);
    Vec::new()
}

/// A host call whose input length wraps around when added to its pointer.
fn overflowing_length(_: &[u8]) -> Vec<u8> {
    let name = b"double";
    raw_hypercall(
        Hypercall::HostCall as u32,
        &[
            name.as_ptr() as u64,
            name.len() as u64,
            0x20_0000,
            u64::MAX - 0x1000,
            0x20_0000,
            16,
        ],
    );
    Vec::new()
}

fn unknown_hypercall(_: &[u8]) -> Vec<u8> {
    raw_hypercall(0xDEAD, &[]);
    Vec::new()
}

/// Reports an output buffer outside guest memory.
fn output_outside_memory(_: &[u8]) -> Vec<u8> {
    let page = abi::ABI_PAGE_ADDR as *mut AbiPage;
    // SAFETY: the ABI page is mapped read/write at CPL3.
    unsafe {
        core::ptr::addr_of_mut!((*page).output_ptr).write_volatile(mem_size() - 8);
        core::ptr::addr_of_mut!((*page).output_len).write_volatile(4096);
        core::ptr::addr_of_mut!((*page).status).write_volatile(abi::STATUS_OK);
    }
    raw_hypercall(Hypercall::Done as u32, &[]);
    Vec::new()
}

/// Returns as many bytes as the little-endian u64 input says.
fn output_of_size(input: &[u8]) -> Vec<u8> {
    let mut len = [0u8; 8];
    len.copy_from_slice(&input[..8]);
    vec![0xAB; u64::from_le_bytes(len) as usize]
}

/// Allocates (and keeps) the number of MiB in the first input byte.
fn alloc_mib(input: &[u8]) -> Vec<u8> {
    let mib = usize::from(input.first().copied().unwrap_or(1));
    let block = vec![1u8; mib << 20];
    core::mem::forget(block);
    Vec::new()
}

fn log(input: &[u8]) -> Vec<u8> {
    snapvm_guest::info!("guest says {}", core::str::from_utf8(input).unwrap_or("?"));
    snapvm_guest::warn!("a warning");
    Vec::new()
}

/// Calls the host function named by the input's first line with the rest,
/// and returns `ok:<output>` or `err:<description>`.
fn host_call(input: &[u8]) -> Vec<u8> {
    let split = input
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(input.len());
    let name = core::str::from_utf8(&input[..split]).unwrap_or("");
    let arg = input.get(split + 1..).unwrap_or(&[]);
    match snapvm_guest::host::call(name, arg) {
        Ok(mut out) => {
            let mut result = b"ok:".to_vec();
            result.append(&mut out);
            result
        }
        Err(e) => alloc::format!("err:{e}").into_bytes(),
    }
}

#[target_feature(enable = "avx")]
fn avx_sum(values: &[f64; 4]) -> f64 {
    use core::arch::x86_64::*;
    // SAFETY: `values` holds four f64s; the unaligned load reads exactly them.
    let v = unsafe { _mm256_loadu_pd(values.as_ptr()) };
    let doubled = _mm256_add_pd(v, v);
    let mut out = [0.0f64; 4];
    // SAFETY: `out` has room for four f64s.
    unsafe { _mm256_storeu_pd(out.as_mut_ptr(), doubled) };
    out.iter().sum()
}

/// Floating point with SSE and AVX: returns the f64 sum of the input bytes
/// (SSE) followed by twice the sum of the first four (AVX).
fn sse_avx(input: &[u8]) -> Vec<u8> {
    let sse: f64 = input.iter().map(|&b| f64::from(b) * 1.5).sum();
    let first = [0, 1, 2, 3].map(|i| f64::from(input.get(i).copied().unwrap_or(0)));
    // SAFETY: the host enables AVX (CR4.OSXSAVE, XCR0) on CPUs that have it;
    // the test calls this only where the host CPU supports AVX.
    let avx = unsafe { avx_sum(&first) };
    let mut out = sse.to_le_bytes().to_vec();
    out.extend_from_slice(&avx.to_le_bytes());
    out
}
