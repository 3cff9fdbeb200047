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
    regenerate_token();
    // Survives resets: the host carries these bytes into the rewound VM.
    snapvm_guest::preserve(&PRESERVED_COUNTER).expect("preserve a counter");
    snapvm_guest::on_restore(regenerate_token);
    snapvm_guest::on_restore(count_restore);
    exports
        .export("random", |_| {
            let mut bytes = vec![0u8; 32];
            snapvm_guest::random_bytes(&mut bytes);
            bytes
        })
        .export("token", |_| {
            TOKEN.load(Ordering::Relaxed).to_le_bytes().to_vec()
        })
        .export("generation", |_| {
            snapvm_guest::generation().to_le_bytes().to_vec()
        })
        .export("restores", |_| {
            RESTORES.load(Ordering::Relaxed).to_le_bytes().to_vec()
        })
        .export("state_dump", state_dump)
        .export("write_pages", write_pages)
        .export("bump", bump)
        .export("leak_kib", leak_kib)
        .export("report_garbage", |input| {
            snapvm_guest::report_garbage(u64::from(input.first().copied().unwrap_or(0)) << 20);
            Vec::new()
        })
        .export("preserve_bad", preserve_bad)
        .export("stash", stash)
        .export("unstash", |_| {
            let len = STASH_LEN.load(Ordering::Relaxed) as usize;
            // SAFETY: only this guest's single thread touches STASH, and
            // never while this reference lives.
            unsafe { (&(*core::ptr::addr_of!(STASH.0)))[..len.min(4096)].to_vec() }
        })
        .export("scribble", scribble)
        .export("disk_write", |input| {
            let ok = snapvm_guest::disk::write(0, input).is_ok();
            vec![u8::from(ok)]
        })
        .export("disk_read", |input| {
            let mut buf = vec![0u8; usize::from(input.first().copied().unwrap_or(0))];
            match snapvm_guest::disk::read(0, &mut buf) {
                Ok(()) => buf,
                Err(_) => b"error".to_vec(),
            }
        })
        .export("dirty_cpu_state", dirty_cpu_state)
        .export("read_cpu_state", read_cpu_state)
        .export("disk_size", |_| {
            snapvm_guest::disk::size().to_le_bytes().to_vec()
        })
        .export("empty", |_| Vec::new())
        .export("echo", |input| input.to_vec())
        .export("counter", counter)
        .export("fill_region", fill_region)
        .export("touch_region", touch_region)
        .export("write_region", write_region)
        .export("panic", |_| panic!("boom {}", 42))
        .export("abort", |_| snapvm_guest::abort("refusing this input"))
        .export("null_deref", null_deref)
        .export("div_zero", div_zero)
        .export("stack_overflow", stack_overflow)
        .export("invalid_opcode", invalid_opcode)
        .export("bad_port", bad_port)
        .export("privileged", privileged)
        .export("infinite_loop", infinite_loop)
        .export("poll_spin_forever", poll_spin_forever)
        .export("poll_forge_result", poll_forge_result)
        .export("poll_host_loop", poll_host_loop)
        .export("poll_output_at", poll_output_at)
        .export("stray_idle", |_| {
            raw_hypercall(Hypercall::Idle as u32, &[]);
            b"resumed".to_vec()
        })
        .export("stray_done", |_| {
            raw_hypercall(Hypercall::Done as u32, &[]);
            b"resumed".to_vec()
        })
        .export("write_system_area", write_system_area)
        .export("bad_log_pointer", bad_log_pointer)
        .export("overflowing_length", overflowing_length)
        .export("unknown_hypercall", unknown_hypercall)
        .export("output_outside_memory", output_outside_memory)
        .export("output_of_size", output_of_size)
        .export("alloc_mib", alloc_mib)
        .export("alloc_then_oom", alloc_then_oom)
        .export("log", log)
        .export("host_call", host_call)
        .export("sse_avx", sse_avx)
        .export_fallible("fallible", fallible)
        .export_typed("total", total)
        .export_typed("ask_host_total", ask_host_total)
        .export("log_levels", |_| {
            use snapvm_guest::LogLevel;
            snapvm_guest::debug!("a debug message {}", 1);
            snapvm_guest::trace!("a trace message");
            [
                LogLevel::Error,
                LogLevel::Warn,
                LogLevel::Info,
                LogLevel::Debug,
                LogLevel::Trace,
            ]
            .map(|l| u8::from(snapvm_guest::log_enabled(l)))
            .to_vec()
        });
}

static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Address and length of the region `fill_region` made (0 before).
static REGION: AtomicU64 = AtomicU64::new(0);
static REGION_LEN: AtomicU64 = AtomicU64::new(0);
static TOKEN: AtomicU64 = AtomicU64::new(0);
static RESTORES: AtomicU64 = AtomicU64::new(0);
static PRESERVED_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A page a request preserves mid-call (`stash`).
#[repr(C, align(4096))]
struct Page([u8; 4096]);
static mut STASH: Page = Page([0; 4096]);
static STASH_LEN: AtomicU64 = AtomicU64::new(0);

/// What a hostile guest under `Always` would try: preserve a page in the
/// middle of a request and copy the request's input into it, hoping the
/// next request finds it. Returns the preserve result (0 = kept).
fn stash(input: &[u8]) -> Vec<u8> {
    let len = input.len().min(4096);
    // SAFETY: only this guest's single thread touches STASH, and no other
    // reference to it is alive here.
    unsafe { (&mut (*core::ptr::addr_of_mut!(STASH.0)))[..len].copy_from_slice(&input[..len]) };
    STASH_LEN.store(len as u64, Ordering::Relaxed);
    // SAFETY: as above; the reference only names the region's address.
    let kept = snapvm_guest::preserve(unsafe { &*core::ptr::addr_of!(STASH) });
    let len_kept = snapvm_guest::preserve(&STASH_LEN);
    vec![u8::from(kept.is_err() || len_kept.is_err())]
}

/// Increments the preserved counter and the ordinary one; returns both.
fn bump(_: &[u8]) -> Vec<u8> {
    let kept = PRESERVED_COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    let plain = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    let mut out = kept.to_le_bytes().to_vec();
    out.extend_from_slice(&plain.to_le_bytes());
    out
}

/// Leaves register state behind: DS and ES loaded with the user data
/// selector (where they started out null) and MXCSR set to round toward
/// zero. A reset must undo all of it.
fn dirty_cpu_state(_: &[u8]) -> Vec<u8> {
    let mxcsr: u32 = 0x7F80;
    let fcw: u16 = 0x027F;
    // SAFETY: loading the flat user data selector into DS/ES is allowed at
    // CPL3 and 64-bit code does not use their bases; the MXCSR and x87
    // control word values are valid (all exceptions masked).
    unsafe {
        asm!("mov eax, 0x1b", "mov ds, ax", "mov es, ax", out("eax") _);
        asm!("ldmxcsr [{}]", in(reg) &mxcsr);
        asm!("fldcw [{}]", in(reg) &fcw);
    }
    Vec::new()
}

/// Reports DS, ES, MXCSR and the x87 control word as the function finds
/// them.
fn read_cpu_state(_: &[u8]) -> Vec<u8> {
    let (ds, es): (u16, u16);
    let mut mxcsr = 0u32;
    let mut fcw = 0u16;
    // SAFETY: reads of registers permitted at CPL3.
    unsafe {
        asm!("mov {0:x}, ds", "mov {1:x}, es", out(reg) ds, out(reg) es);
        asm!("stmxcsr [{}]", in(reg) &mut mxcsr);
        asm!("fnstcw [{}]", in(reg) &mut fcw);
    }
    [
        u64::from(ds),
        u64::from(es),
        u64::from(mxcsr),
        u64::from(fcw),
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect()
}

/// Leaks as many KiB as the first input byte says (default 1).
fn leak_kib(input: &[u8]) -> Vec<u8> {
    let kib = usize::from(input.first().copied().unwrap_or(1));
    core::mem::forget(vec![0x55u8; kib << 10]);
    Vec::new()
}

/// Asks to preserve a region outside the program area and one larger than
/// the limit; returns the two results as status bytes.
fn preserve_bad(_: &[u8]) -> Vec<u8> {
    let code = |r: Result<(), snapvm_guest::PreserveError>| match r {
        Ok(()) => 0u8,
        Err(snapvm_guest::PreserveError::OutOfRange) => 1,
        Err(snapvm_guest::PreserveError::TooLarge) => 2,
        Err(_) => 3,
    };
    let outside = snapvm_guest::preserve_region(mem_size() - 8, 4096);
    let abi_page = snapvm_guest::preserve_region(abi::ABI_PAGE_ADDR, 8);
    let huge = snapvm_guest::preserve_region(abi::USER_BASE, 64 << 20);
    let too_much = snapvm_guest::preserve_region(abi::USER_BASE, 2 << 20);
    vec![code(outside), code(abi_page), code(huge), code(too_much)]
}

/// Writes pseudo-random bytes over every page it may write: the whole heap
/// above the current break, static data, the unused stack below this frame
/// and the ABI page (input: a seed byte).
fn scribble(input: &[u8]) -> Vec<u8> {
    let mut x = u64::from(input.first().copied().unwrap_or(1)) | 0x9E37_79B9_0000_0000;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let page = abi::ABI_PAGE_ADDR as *const AbiPage;
    // SAFETY: the ABI page is mapped read/write at CPL3.
    let (heap_start, heap_end) = unsafe {
        (
            core::ptr::addr_of!((*page).heap_start).read_volatile(),
            core::ptr::addr_of!((*page).heap_end).read_volatile(),
        )
    };
    // The top 64 KiB of the heap region (free memory), one word per page.
    let mut addr = heap_end - (64 << 10);
    while addr < heap_end {
        // SAFETY: free heap memory that nothing references; aligned.
        unsafe { (addr as *mut u64).write_volatile(next()) };
        addr += 512;
    }
    // The unused stack: well below this frame.
    let here = &x as *const u64 as u64;
    let mut addr = abi::STACK_BOTTOM;
    while addr + 0x4000 < here {
        // SAFETY: stack memory below the live frames, unused.
        unsafe { (addr as *mut u64).write_volatile(next()) };
        addr += 1024;
    }
    // Hostile writes to the ABI page's host-owned fields.
    // SAFETY: the ABI page is mapped read/write at CPL3.
    unsafe {
        core::ptr::addr_of_mut!((*(page as *mut AbiPage)).magic).write_volatile(next());
        core::ptr::addr_of_mut!((*(page as *mut AbiPage)).heap_end).write_volatile(next());
        core::ptr::addr_of_mut!((*(page as *mut AbiPage)).entropy).write_volatile([0; 4]);
    }
    let _ = heap_start;
    write_pages(&[255, next() as u8])
}

/// A secret cached at init; regenerated by a restore hook so restored
/// copies never share it.
fn regenerate_token() {
    TOKEN.store(snapvm_guest::random_u64(), Ordering::Relaxed);
}

fn count_restore() {
    RESTORES.fetch_add(1, Ordering::Relaxed);
}

/// Everything about the CPU a CPL3 program can read, plus a digest of the
/// guest's static data: equal before a snapshot and after its restore.
fn state_dump(_: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |v: u64| out.extend_from_slice(&v.to_le_bytes());
    let (rflags, cs, ss, ds, es, fs, gs): (u64, u16, u16, u16, u16, u16, u16);
    let mut gdt = [0u8; 10];
    let mut idt = [0u8; 10];
    let (tr, ldt, msw): (u16, u16, u16);
    let (xcr0_lo, xcr0_hi): (u32, u32);
    let mut mxcsr = 0u32;
    let mut fcw = 0u16;
    // SAFETY: reads of CPU state that are permitted at CPL3 (SGDT/SIDT/STR/
    // SLDT/SMSW are allowed without UMIP); stores go to local buffers.
    unsafe {
        asm!("pushfq", "pop {}", out(reg) rflags);
        asm!("mov {0:x}, cs", "mov {1:x}, ss", "mov {2:x}, ds", out(reg) cs, out(reg) ss, out(reg) ds);
        asm!("mov {0:x}, es", "mov {1:x}, fs", "mov {2:x}, gs", out(reg) es, out(reg) fs, out(reg) gs);
        asm!("sgdt [{}]", in(reg) gdt.as_mut_ptr());
        asm!("sidt [{}]", in(reg) idt.as_mut_ptr());
        asm!("str {0:x}", "sldt {1:x}", "smsw {2:x}", out(reg) tr, out(reg) ldt, out(reg) msw);
        asm!("xgetbv", in("ecx") 0, out("eax") xcr0_lo, out("edx") xcr0_hi);
        asm!("stmxcsr [{}]", in(reg) &mut mxcsr);
        asm!("fnstcw [{}]", in(reg) &mut fcw);
    }
    push(rflags & !0x10); // ignore RF
    for sel in [cs, ss, ds, es, fs, gs, tr, ldt, msw] {
        push(u64::from(sel));
    }
    for b in gdt.iter().chain(&idt) {
        push(u64::from(*b));
    }
    push(u64::from(xcr0_lo) | u64::from(xcr0_hi) << 32);
    push(u64::from(mxcsr));
    push(u64::from(fcw));
    for leaf in [0u32, 1, 7, 0xD, 0x8000_0001] {
        let r = core::arch::x86_64::__cpuid_count(leaf, 0);
        // Leaf 1 EBX bits 31:24 are the initial APIC id. Where CPUID runs
        // natively at CPL3 (KVM without VT-x) it is the id of the physical
        // core the vCPU thread happens to run on, not VM state: masked.
        let ebx = if leaf == 1 {
            r.ebx & 0x00FF_FFFF
        } else {
            r.ebx
        };
        for v in [r.eax, ebx, r.ecx, r.edx] {
            push(u64::from(v));
        }
    }
    push(COUNTER.load(Ordering::Relaxed));
    push(TOKEN.load(Ordering::Relaxed));
    push(snapvm_guest::heap_used() as u64);
    out
}

/// Writes one byte into each of N distinct 4 KiB pages of a static buffer
/// (N = first input byte): a request that dirties exactly N pages.
fn write_pages(input: &[u8]) -> Vec<u8> {
    static mut PAGES: [u8; 256 * 4096] = [0; 256 * 4096];
    let n = usize::from(input.first().copied().unwrap_or(1));
    let value = input.get(1).copied().unwrap_or(1);
    for i in 0..n {
        // SAFETY: single-threaded guest; the index is inside the buffer.
        unsafe { core::ptr::addr_of_mut!(PAGES[i * 4096]).write_volatile(value) };
    }
    Vec::new()
}

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

/// Polling mode, hostile: sets the spin window the runtime reads after
/// this call returns to forever, so the guest never stops by itself.
fn poll_spin_forever(_: &[u8]) -> Vec<u8> {
    let page = abi::ABI_PAGE_ADDR as *mut AbiPage;
    // SAFETY: the ABI page is mapped read/write at CPL3.
    unsafe { core::ptr::addr_of_mut!((*page).poll_window).write_volatile(u64::MAX) };
    b"spinning".to_vec()
}

/// Polling mode, hostile: publishes a result whose output lies past the
/// end of guest memory, then never returns (nor answers a stop request).
fn poll_forge_result(_: &[u8]) -> Vec<u8> {
    let page = abi::ABI_PAGE_ADDR as *mut AbiPage;
    // SAFETY: the ABI page is mapped read/write at CPL3.
    unsafe {
        core::ptr::addr_of_mut!((*page).output_ptr).write_volatile(mem_size() - 8);
        core::ptr::addr_of_mut!((*page).output_len).write_volatile(4096);
        core::ptr::addr_of_mut!((*page).status).write_volatile(abi::STATUS_OK);
        let seq = core::ptr::addr_of!((*page).poll_seq).read_volatile();
        core::ptr::addr_of_mut!((*page).poll_done).write_volatile(seq);
    }
    loop {
        core::hint::spin_loop();
    }
}

/// Polling mode: publishes as its result the `len` bytes at guest address
/// `addr` (input: `addr` and `len`, u64 LE each) without ever reading them,
/// so the host is the first to touch them; then never returns (nor answers
/// a stop request).
fn poll_output_at(input: &[u8]) -> Vec<u8> {
    let word = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&input[i..i + 8]);
        u64::from_le_bytes(bytes)
    };
    let page = abi::ABI_PAGE_ADDR as *mut AbiPage;
    // SAFETY: the ABI page is mapped read/write at CPL3.
    unsafe {
        core::ptr::addr_of_mut!((*page).output_ptr).write_volatile(word(0));
        core::ptr::addr_of_mut!((*page).output_len).write_volatile(word(8));
        core::ptr::addr_of_mut!((*page).status).write_volatile(abi::STATUS_OK);
        let seq = core::ptr::addr_of!((*page).poll_seq).read_volatile();
        core::ptr::addr_of_mut!((*page).poll_done).write_volatile(seq);
    }
    loop {
        core::hint::spin_loop();
    }
}

/// Polling mode, hostile: publishes an empty result for the call it
/// serves, then calls the host function `noop` forever (every call an
/// exit, none of them a stop).
fn poll_host_loop(_: &[u8]) -> Vec<u8> {
    let page = abi::ABI_PAGE_ADDR as *mut AbiPage;
    // SAFETY: the ABI page is mapped read/write at CPL3.
    unsafe {
        core::ptr::addr_of_mut!((*page).output_ptr).write_volatile(abi::USER_BASE);
        core::ptr::addr_of_mut!((*page).output_len).write_volatile(0);
        core::ptr::addr_of_mut!((*page).status).write_volatile(abi::STATUS_OK);
        let seq = core::ptr::addr_of!((*page).poll_seq).read_volatile();
        core::ptr::addr_of_mut!((*page).poll_done).write_volatile(seq);
    }
    loop {
        let _ = snapvm_guest::host::call("noop", b"");
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

/// Keeps as many MiB as the first input byte says, then asks for far more
/// than guest memory: runs out of memory with that much more in use.
fn alloc_then_oom(input: &[u8]) -> Vec<u8> {
    alloc_mib(input);
    let huge = black_box(1usize << 40);
    vec![2u8; huge]
}

/// A typed function: an order in, its total out; an overflow is an error.
#[derive(serde::Deserialize)]
struct Order {
    items: u32,
    price_cents: u64,
    note: alloc::string::String,
}

#[derive(serde::Serialize)]
struct Total {
    cents: u64,
    note_len: usize,
}

fn total(order: Order) -> Result<Total, snapvm_guest::GuestError> {
    let cents = order
        .price_cents
        .checked_mul(u64::from(order.items))
        .ok_or_else(|| snapvm_guest::GuestError::new(422, "total overflows"))?;
    Ok(Total {
        cents,
        note_len: order.note.len(),
    })
}

/// Asks the typed host function `host_total` for the total of `items`
/// at `price_cents` each.
fn ask_host_total(order: (u32, u64)) -> Result<u64, snapvm_guest::GuestError> {
    snapvm_guest::host::call_typed::<(u32, u64), u64>("host_total", &order)
        .map_err(|e| snapvm_guest::GuestError::new(1, alloc::format!("{e}")))
}

/// Succeeds on `ok`; any other input is an error the caller handles.
fn fallible(input: &[u8]) -> Result<Vec<u8>, snapvm_guest::GuestError> {
    COUNTER.fetch_add(1, Ordering::Relaxed);
    match input {
        b"ok" => Ok(b"fine".to_vec()),
        other => Err(snapvm_guest::GuestError::new(
            42,
            alloc::format!("cannot handle {} bytes", other.len()),
        )),
    }
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

/// Allocates and keeps a region of N MiB (N = u16 LE in the first two
/// input bytes), every word pseudo-random (seed: third byte): memory a
/// snapshot stores in full. Replaces an earlier region (which stays
/// allocated).
fn fill_region(input: &[u8]) -> Vec<u8> {
    let mib = u16::from_le_bytes([input[0], input[1]]) as usize;
    let mut x = u64::from(input.get(2).copied().unwrap_or(1)) | 0x9E37_79B9_0000_0000;
    let mut region = vec![0u64; mib << 17];
    for w in region.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    REGION.store(region.as_ptr() as u64, Ordering::Relaxed);
    REGION_LEN.store((mib << 20) as u64, Ordering::Relaxed);
    core::mem::forget(region);
    Vec::new()
}

/// Reads one word from each of N pages of the `fill_region` region (N = u32
/// LE in input bytes 0..4), in runs of R consecutive pages (R = u32 LE in
/// bytes 4..8, default 1) spread evenly over the region, and returns the
/// wrapping sum of the words: a request whose working set is N scattered
/// pages.
fn touch_region(input: &[u8]) -> Vec<u8> {
    let word = |i: usize| {
        input
            .get(i..i + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64)
    };
    let (n, run) = (word(0), word(4).max(1));
    let (base, len) = (
        REGION.load(Ordering::Relaxed),
        REGION_LEN.load(Ordering::Relaxed),
    );
    let pages = len / 4096;
    let runs = n.div_ceil(run).max(1);
    let stride = (pages / runs).max(run);
    let mut sum = 0u64;
    let mut done = 0;
    'outer: for r in 0..runs {
        for p in 0..run {
            let page = r * stride + p;
            if done == n || page >= pages {
                break 'outer;
            }
            // SAFETY: inside the region `fill_region` allocated and leaked.
            sum = sum.wrapping_add(unsafe { ((base + page * 4096) as *const u64).read_volatile() });
            done += 1;
        }
    }
    sum.to_le_bytes().to_vec()
}

/// Writes one byte into each page of runs of pages of the `fill_region`
/// region: the input is 5-byte records (first page u16 LE, page count u16
/// LE, value). The byte sits at a different offset in each page (anywhere
/// from its start to its end); value 0 writes back the byte already there
/// (a write that changes nothing). Pages past the region are skipped.
/// Returns how many pages were written (u64 LE).
fn write_region(input: &[u8]) -> Vec<u8> {
    let (base, len) = (
        REGION.load(Ordering::Relaxed),
        REGION_LEN.load(Ordering::Relaxed),
    );
    let pages = len / 4096;
    let mut written = 0u64;
    for record in input.chunks_exact(5) {
        let first = u64::from(u16::from_le_bytes([record[0], record[1]]));
        let count = u64::from(u16::from_le_bytes([record[2], record[3]]));
        let value = record[4];
        for page in first..(first + count).min(pages) {
            let offset = (page * 8 + u64::from(value) * 64) % 4096;
            let at = (base + page * 4096 + offset) as *mut u8;
            // SAFETY: inside the region `fill_region` allocated and leaked.
            unsafe {
                let byte = if value == 0 {
                    at.read_volatile()
                } else {
                    value
                };
                at.write_volatile(byte);
            }
            written += 1;
        }
    }
    written.to_le_bytes().to_vec()
}
