//! `snapvm-abi`: the host/guest ABI of snapvm micro-VMs — guest memory
//! layout, the hypercall port, hypercall numbers and the shared ABI page.
//!
//! This crate is the single definition both sides compile: the host crate
//! (`snapvm`) re-exports it as `snapvm::abi`, the guest runtime
//! (`snapvm-guest`) as `snapvm_guest::abi`. It is `no_std` and has no
//! dependencies, so depending on it pulls in nothing else. Every value is
//! pinned by a compile-time assertion at the bottom of the file, so an
//! accidental change fails the build instead of producing guests that
//! silently disagree with their host. Changing a value on purpose means
//! bumping [`ABI_VERSION`].
//!
//! # Memory layout (guest-physical = guest-virtual, identity-mapped)
//!
//! ```text
//! 0x0000_0000  null guard page            not present: a null dereference faults
//! 0x0000_1000  ABI page                   user read/write, shared with the host
//! 0x0000_2000  system area                supervisor only: GDT, IDT, TSS, exception
//!              .. 0x0010_0000             stubs, CPL0 stacks, page tables
//! 0x0010_0000  stack guard page           not present: a stack overflow faults
//! 0x0010_1000  user stack                 grows down from 0x0020_0000
//! 0x0020_0000  program image and heap     2 MiB pages; ELF segments start here or
//!              .. memory size             above, the heap follows the image
//! ```
#![no_std]

/// Version of this ABI. A host refuses guests built against another version.
pub const ABI_VERSION: u32 = 1;

/// Magic value at the start of the ABI page (`"SNAPVMAB"`, little endian).
pub const ABI_MAGIC: u64 = u64::from_le_bytes(*b"SNAPVMAB");

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;

/// Size of a large page; guest memory is a multiple of it.
pub const HUGE_PAGE_SIZE: u64 = 0x20_0000;

/// Guest address of the ABI page.
pub const ABI_PAGE_ADDR: u64 = 0x1000;

/// First byte of the supervisor-only system area.
pub const SYSTEM_AREA_START: u64 = 0x2000;

/// One past the last byte of the system area.
pub const SYSTEM_AREA_END: u64 = 0x10_0000;

/// Guest address of the (unmapped) page below the user stack.
pub const STACK_GUARD_ADDR: u64 = 0x10_0000;

/// Lowest usable address of the user stack.
pub const STACK_BOTTOM: u64 = 0x10_1000;

/// Initial stack pointer region top (the stack grows down from here).
pub const STACK_TOP: u64 = 0x20_0000;

/// Lowest address a program segment may occupy.
pub const USER_BASE: u64 = 0x20_0000;

/// The I/O port a guest writes a [`Hypercall`] number to (32-bit `out`).
pub const PORT_HYPERCALL: u16 = 0xF0;

/// The I/O port the CPL0 exception stubs write to. Not accessible from CPL3.
pub const PORT_FAULT: u16 = 0xF8;

/// Hypercall numbers, written as a 32-bit value to [`PORT_HYPERCALL`].
///
/// Arguments travel in [`AbiPage::args`], results in [`AbiPage::ret`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// Init finished; [`AbiPage::func_table`] and [`AbiPage::input_buf`] are valid.
    Ready = 1,
    /// The current request finished; for a call, the output is described by
    /// [`AbiPage::output_ptr`] and [`AbiPage::output_len`].
    Done = 2,
    /// Log a message: `args = [level, ptr, len]`, level 1 (error) ..= 5 (trace).
    Log = 3,
    /// Call a host function:
    /// `args = [name_ptr, name_len, in_ptr, in_len, out_ptr, out_cap]`;
    /// `ret = [status, len]` with status one of the `HOST_CALL_*` values.
    HostCall = 4,
    /// Fetch a host function result that did not fit: `args = [ptr, cap]`;
    /// `ret = [status, len]`.
    HostResult = 5,
    /// The guest panicked:
    /// `args = [msg_ptr, msg_len, file_ptr, file_len, line, column]`.
    Panic = 6,
    /// The guest aborted on purpose: `args = [msg_ptr, msg_len]`.
    Abort = 7,
    /// Preserve a memory region across resets: `args = [ptr, len]`;
    /// `ret = [status]` with status one of the `PRESERVE_*` values.
    Preserve = 8,
    /// The guest ran out of heap: `args = [requested_bytes]`. Never returns.
    OutOfMemory = 9,
    /// A transaction starts here (at most one per call). Under a host
    /// transaction runner the host checkpoints the VM and, to retry, rewinds
    /// it to right after this hypercall; `ret = [attempt]`, 1 for the first
    /// attempt (always 1 without a runner). A guest that sets
    /// [`GUEST_FLAG_RESETS_VECTOR_STATE`] resets its vector state around
    /// this hypercall as around `Ready` and `Done`.
    TxBegin = 10,
    /// The transaction ends: `args = [outcome, reason_ptr, reason_len]`,
    /// outcome [`TX_COMMIT`] or [`TX_ABORT`] (with a UTF-8 reason).
    TxEnd = 11,
    /// Export a profile blob for later environments of the same code and
    /// tenant: `args = [ptr, len]`; `ret = [status]` with status one of the
    /// `TRACE_*` values.
    TraceExport = 16,
    /// Import the newest profile blob an earlier environment exported:
    /// `args = [ptr, cap]`; `ret = [status, len]` with status one of the
    /// `TRACE_*` values (`TRACE_TOO_SMALL` gives the length needed).
    TraceImport = 17,
    /// The network device's identity: `ret = [status, mac, ip, gateway]`
    /// with status one of the `NET_*` values, the MAC address in the low 48
    /// bits of `mac` (first octet lowest), the IPv4 address in the low 32
    /// bits of `ip` (first octet highest, as `u32::from(Ipv4Addr)`) and its
    /// prefix length in bits 32..40, the gateway likewise in the low 32
    /// bits of `gateway` and, in its bits 32..64, the most bytes of frames
    /// the host takes and returns in one [`Hypercall::NetExchange`]
    /// ([`NET_MAX_BATCH`]; 0 from hosts that predate it, which take
    /// [`NET_MAX_TX`] and return [`NET_MAX_RX`]).
    NetInfo = 20,
    /// Exchange Ethernet frames with the network device:
    /// `args = [tx_ptr, tx_len, rx_ptr, rx_cap, wait_us]`. The host sends
    /// the frames at `tx_ptr` (each a little-endian `u16` length and that
    /// many bytes), then fills the buffer at `rx_ptr` with received frames
    /// in the same format, waiting up to `wait_us` microseconds (at most
    /// [`NET_MAX_WAIT_US`]) for the first one. `ret = [status, rx_len,
    /// now_us, tx_dropped]`: `now_us` is the host's monotonic clock.
    NetExchange = 21,
    /// Polling mode (see [`AbiPage::poll_window`]): the guest spun for its
    /// window after a call and saw no new request, so it stops. No
    /// arguments. The host resumes it when the next request was written;
    /// it then serves whatever [`AbiPage::request`] holds, as after `Done`.
    Idle = 28,
}

impl Hypercall {
    /// Decodes a hypercall number.
    pub const fn from_u32(nr: u32) -> Option<Self> {
        Some(match nr {
            1 => Self::Ready,
            2 => Self::Done,
            3 => Self::Log,
            4 => Self::HostCall,
            5 => Self::HostResult,
            6 => Self::Panic,
            7 => Self::Abort,
            8 => Self::Preserve,
            9 => Self::OutOfMemory,
            10 => Self::TxBegin,
            11 => Self::TxEnd,
            16 => Self::TraceExport,
            17 => Self::TraceImport,
            20 => Self::NetInfo,
            21 => Self::NetExchange,
            28 => Self::Idle,
            _ => return None,
        })
    }
}

/// [`AbiPage::request`]: call function [`AbiPage::func_index`] with
/// [`AbiPage::input_len`] bytes at [`AbiPage::input_buf`].
pub const REQUEST_CALL: u64 = 1;
/// [`AbiPage::request`]: make the input buffer at least
/// [`AbiPage::input_len`] bytes long, then report `Done`.
pub const REQUEST_GROW_INPUT: u64 = 2;
/// [`AbiPage::request`] in polling mode: stop spinning now (make the
/// `Idle` hypercall) without serving anything. The host asks for this
/// before it resets, snapshots or hands back a polling VM.
pub const REQUEST_IDLE: u64 = 3;

/// [`AbiPage::status`] after a request: success.
pub const STATUS_OK: u64 = 0;
/// [`AbiPage::status`] after `REQUEST_GROW_INPUT`: the guest is out of memory.
pub const STATUS_OUT_OF_MEMORY: u64 = 1;
/// [`AbiPage::status`]: the request was malformed (bad index or kind).
pub const STATUS_BAD_REQUEST: u64 = 2;
/// [`AbiPage::status`] after a call: the function returned an error. Its
/// code is in `args[0]` and its UTF-8 message is the output
/// ([`AbiPage::output_ptr`], [`AbiPage::output_len`]). The guest is
/// undisturbed: the VM stays ready.
pub const STATUS_GUEST_ERROR: u64 = 3;

/// The error code (with [`STATUS_GUEST_ERROR`]) of a typed function whose
/// input did not decode: the request was wrong and the function never ran.
/// The host reports it as a bad request, not as the guest's own error.
pub const ERROR_BAD_INPUT: u32 = u32::MAX;

/// The error code (with [`STATUS_GUEST_ERROR`]) of a typed function whose
/// output did not encode.
pub const ERROR_BAD_OUTPUT: u32 = u32::MAX - 1;

/// Host call status: the result was written to the guest's buffer.
pub const HOST_CALL_OK: u64 = 0;
/// Host call status: the result is `ret[1]` bytes, more than the buffer
/// holds; fetch it with [`Hypercall::HostResult`].
pub const HOST_CALL_TOO_SMALL: u64 = 1;
/// Host call status: no host function has that name.
pub const HOST_CALL_UNKNOWN: u64 = 2;
/// Host call status: the host function failed; its message is the result.
pub const HOST_CALL_FAILED: u64 = 3;
/// Host call status: no result is pending (for `HostResult`).
pub const HOST_CALL_NO_RESULT: u64 = 4;

/// Preserve status: the region will survive resets.
pub const PRESERVE_OK: u64 = 0;
/// Preserve status: the region is not inside the program area of guest memory.
pub const PRESERVE_OUT_OF_RANGE: u64 = 1;
/// Preserve status: the VM's limit on preserved bytes or regions is exceeded.
pub const PRESERVE_TOO_LARGE: u64 = 2;

/// [`Hypercall::TxEnd`] outcome: the transaction succeeded.
pub const TX_COMMIT: u64 = 0;
/// [`Hypercall::TxEnd`] outcome: the transaction failed; the arguments
/// carry the reason.
pub const TX_ABORT: u64 = 1;
/// Trace status: the blob was stored (export) or copied (import).
pub const TRACE_OK: u64 = 0;
/// Trace status (import): no blob is stored for this code and tenant.
pub const TRACE_NONE: u64 = 1;
/// Trace status (import): the blob is `ret[1]` bytes, more than the buffer
/// holds; nothing was copied.
pub const TRACE_TOO_SMALL: u64 = 2;
/// Trace status (export): the blob exceeds the VM's profile size limit.
pub const TRACE_TOO_LARGE: u64 = 3;
/// Trace status: the host keeps no profiles for this VM, or failed to
/// store this one.
pub const TRACE_UNAVAILABLE: u64 = 4;
/// Network status: the call was served.
pub const NET_OK: u64 = 0;
/// Network status: this VM has no network device.
pub const NET_NO_DEVICE: u64 = 1;
/// Longest Ethernet frame (header included, no FCS) the device carries.
pub const NET_MAX_FRAME: u64 = 1514;
/// Bytes of frames every host accepts in one [`Hypercall::NetExchange`]
/// (hosts before [`NET_MAX_BATCH`] accept no more).
pub const NET_MAX_TX: u64 = 64 * 1024;
/// Bytes of frames every host returns in one [`Hypercall::NetExchange`]
/// (hosts before [`NET_MAX_BATCH`] return no more).
pub const NET_MAX_RX: u64 = 64 * 1024;
/// Most bytes of frames this host accepts, and returns, in one
/// [`Hypercall::NetExchange`]; it says so in [`Hypercall::NetInfo`]. A
/// guest sends larger batches than [`NET_MAX_TX`] only to a host that said
/// it takes them (more bytes per exit for a bulk transfer).
pub const NET_MAX_BATCH: u64 = 256 * 1024;
/// Longest wait of one [`Hypercall::NetExchange`], in microseconds.
pub const NET_MAX_WAIT_US: u64 = 1_000_000;
/// The function a guest with networking exports so the host can make its
/// stack take in frames the host queued (see `snapvm_guest::net`).
pub const NET_POLL_EXPORT: &str = "snapvm.net.poll";

/// [`AbiPage::garbage`] when the guest reported no garbage measure.
pub const GARBAGE_UNREPORTED: u64 = u64::MAX;

/// Longest function name the host accepts, in bytes.
pub const MAX_FUNCTION_NAME: u64 = 256;
/// Most functions a guest may export.
pub const MAX_FUNCTIONS: u64 = 4096;

/// One exported function, as listed in [`AbiPage::func_table`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FuncEntry {
    /// Guest address of the UTF-8 name.
    pub name_ptr: u64,
    /// Length of the name in bytes.
    pub name_len: u64,
}

/// The shared page at [`ABI_PAGE_ADDR`].
///
/// The host writes the boot fields before the first instruction and the
/// request fields before resuming the guest; the guest writes everything
/// else before a hypercall. The host treats every guest-written field as
/// untrusted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AbiPage {
    /// [`ABI_MAGIC`], written by the host.
    pub magic: u64,
    /// [`ABI_VERSION`], written by the host.
    pub version: u32,
    /// The ABI version the guest was built with, written by the guest at `Ready`.
    pub guest_version: u32,
    /// Guest memory size in bytes (host → guest, at boot).
    pub mem_size: u64,
    /// First byte of the heap (host → guest, at boot).
    pub heap_start: u64,
    /// One past the last byte of the heap (host → guest, at boot).
    pub heap_end: u64,
    /// Address of the [`FuncEntry`] array (guest → host, at `Ready`).
    pub func_table: u64,
    /// Number of entries in the function table (guest → host, at `Ready`).
    pub func_count: u64,
    /// Address of the input buffer (guest → host, at `Ready` and after a grow).
    pub input_buf: u64,
    /// Capacity of the input buffer in bytes (guest → host).
    pub input_cap: u64,
    /// Request kind, `REQUEST_*` (host → guest).
    pub request: u64,
    /// Index into the function table (host → guest).
    pub func_index: u64,
    /// Input length, or the wanted capacity for a grow (host → guest).
    pub input_len: u64,
    /// Address of the output (guest → host, at `Done`).
    pub output_ptr: u64,
    /// Length of the output (guest → host, at `Done`).
    pub output_len: u64,
    /// Request status, `STATUS_*` (guest → host, at `Done`).
    pub status: u64,
    /// Bytes currently allocated on the guest heap (guest → host, at `Ready`,
    /// `Done` and `OutOfMemory`).
    pub heap_used: u64,
    /// Hypercall arguments (guest → host).
    pub args: [u64; 8],
    /// Hypercall results (host → guest).
    pub ret: [u64; 4],
    /// Generation of this VM lifetime (host → guest): a new random value at
    /// boot and at every restore, written before the guest runs again.
    pub generation: u64,
    /// 256 bits of fresh entropy (host → guest), written with `generation`.
    pub entropy: [u64; 4],
    /// Garbage bytes as the guest measures them (guest → host, at `Done`),
    /// or [`GARBAGE_UNREPORTED`].
    pub garbage: u64,
    /// Guest address of the scratch disk, 0 if none (host → guest, at boot).
    pub disk_addr: u64,
    /// Size of the scratch disk in bytes (host → guest, at boot).
    pub disk_size: u64,
    /// `GUEST_FLAG_*` bits (guest → host, at `Ready`).
    pub guest_flags: u64,
    /// The most verbose guest log level the host passes on (host → guest,
    /// at boot and before every call): [`LOG_LEVEL_SET`] | level, level 0
    /// for none and 1 (error) ..= 5 (trace) as in [`Hypercall::Log`]. A
    /// guest skips messages above it without formatting them or making an
    /// exit. Without [`LOG_LEVEL_SET`] (a host that does not say) the guest
    /// sends every message.
    pub log_level: u64,
    /// Polling mode (host → guest): the sequence number of the newest
    /// request. The host writes the request fields first, then this word;
    /// a spinning guest that sees it change serves the request without an
    /// exit.
    pub poll_seq: u64,
    /// Polling mode (guest → host): the [`AbiPage::poll_seq`] of the last
    /// request whose result (status, output) is complete. Written after
    /// every other result field.
    pub poll_done: u64,
    /// Polling mode (host → guest, before every call): after a call the
    /// guest spins on [`AbiPage::poll_seq`] for this many time-stamp-counter
    /// ticks (`rdtsc`, with `pause` between reads) before it stops with
    /// [`Hypercall::Idle`]; 0 turns polling off (the guest stops with
    /// `Done` after each call).
    pub poll_window: u64,
}

/// Marks [`AbiPage::log_level`] as set by the host.
pub const LOG_LEVEL_SET: u64 = 0x100;

/// [`AbiPage::guest_flags`]: right before and after every `Ready`, `Done`
/// and `Idle` hypercall (the points a VM is captured at and reset to), and
/// around every `TxBegin` (the point a transaction is rewound to), the guest
/// itself puts its x87/SSE/AVX state in the initial state (`xrstor` of an
/// all-init area, then `ldmxcsr` of the default 0x1F80). A host rewinding
/// such a guest to one of those points need not restore the vector state.
/// A guest that cannot use XSAVE leaves the flag clear and resets its x87
/// and SSE state with `fxrstor` at the same points.
pub const GUEST_FLAG_RESETS_VECTOR_STATE: u64 = 1;

// Pin the ABI: a change to any of these values is a breaking ABI change.
const _: () = {
    assert!(ABI_VERSION == 1);
    assert!(ABI_PAGE_ADDR == 0x1000);
    assert!(SYSTEM_AREA_START == 0x2000 && SYSTEM_AREA_END == 0x10_0000);
    assert!(STACK_GUARD_ADDR == 0x10_0000 && STACK_BOTTOM == 0x10_1000);
    assert!(STACK_TOP == 0x20_0000 && USER_BASE == 0x20_0000);
    assert!(PORT_HYPERCALL == 0xF0 && PORT_FAULT == 0xF8);
    assert!(core::mem::size_of::<FuncEntry>() == 16);
    assert!(core::mem::size_of::<AbiPage>() == 328);
    assert!(core::mem::size_of::<AbiPage>() as u64 <= PAGE_SIZE);
    assert!(core::mem::offset_of!(AbiPage, request) == 72);
    assert!(core::mem::offset_of!(AbiPage, args) == 128);
    assert!(core::mem::offset_of!(AbiPage, ret) == 192);
    assert!(core::mem::offset_of!(AbiPage, generation) == 224);
    assert!(core::mem::offset_of!(AbiPage, garbage) == 264);
    // Every field's offset.
    assert!(core::mem::offset_of!(AbiPage, magic) == 0);
    assert!(core::mem::offset_of!(AbiPage, version) == 8);
    assert!(core::mem::offset_of!(AbiPage, guest_version) == 12);
    assert!(core::mem::offset_of!(AbiPage, mem_size) == 16);
    assert!(core::mem::offset_of!(AbiPage, heap_start) == 24);
    assert!(core::mem::offset_of!(AbiPage, heap_end) == 32);
    assert!(core::mem::offset_of!(AbiPage, func_table) == 40);
    assert!(core::mem::offset_of!(AbiPage, func_count) == 48);
    assert!(core::mem::offset_of!(AbiPage, input_buf) == 56);
    assert!(core::mem::offset_of!(AbiPage, input_cap) == 64);
    assert!(core::mem::offset_of!(AbiPage, func_index) == 80);
    assert!(core::mem::offset_of!(AbiPage, input_len) == 88);
    assert!(core::mem::offset_of!(AbiPage, output_ptr) == 96);
    assert!(core::mem::offset_of!(AbiPage, output_len) == 104);
    assert!(core::mem::offset_of!(AbiPage, status) == 112);
    assert!(core::mem::offset_of!(AbiPage, heap_used) == 120);
    assert!(core::mem::offset_of!(AbiPage, entropy) == 232);
    assert!(core::mem::offset_of!(AbiPage, disk_addr) == 272);
    assert!(core::mem::offset_of!(AbiPage, disk_size) == 280);
    assert!(core::mem::offset_of!(AbiPage, guest_flags) == 288);
    assert!(core::mem::offset_of!(AbiPage, log_level) == 296);
    assert!(core::mem::offset_of!(AbiPage, poll_seq) == 304);
    assert!(core::mem::offset_of!(AbiPage, poll_done) == 312);
    assert!(core::mem::offset_of!(AbiPage, poll_window) == 320);
    assert!(Hypercall::Idle as u32 == 28 && REQUEST_IDLE == 3);
    assert!(LOG_LEVEL_SET == 0x100);
    assert!(core::mem::offset_of!(FuncEntry, name_len) == 8);
    // Every value that crosses the boundary.
    assert!(ABI_MAGIC == 0x4241_4d56_5041_4e53);
    assert!(PAGE_SIZE == 0x1000 && HUGE_PAGE_SIZE == 0x20_0000);
    assert!(Hypercall::Ready as u32 == 1);
    assert!(Hypercall::Done as u32 == 2);
    assert!(Hypercall::Log as u32 == 3);
    assert!(Hypercall::HostCall as u32 == 4);
    assert!(Hypercall::HostResult as u32 == 5);
    assert!(Hypercall::Panic as u32 == 6);
    assert!(Hypercall::Abort as u32 == 7);
    assert!(Hypercall::Preserve as u32 == 8);
    assert!(Hypercall::OutOfMemory as u32 == 9);
    assert!(Hypercall::TxBegin as u32 == 10 && Hypercall::TxEnd as u32 == 11);
    assert!(TX_COMMIT == 0 && TX_ABORT == 1);
    assert!(Hypercall::TraceExport as u32 == 16);
    assert!(Hypercall::TraceImport as u32 == 17);
    assert!(TRACE_OK == 0 && TRACE_NONE == 1 && TRACE_TOO_SMALL == 2);
    assert!(TRACE_TOO_LARGE == 3 && TRACE_UNAVAILABLE == 4);
    assert!(Hypercall::NetInfo as u32 == 20);
    assert!(Hypercall::NetExchange as u32 == 21);
    assert!(NET_OK == 0 && NET_NO_DEVICE == 1 && NET_MAX_FRAME == 1514);
    assert!(NET_MAX_TX == 65536 && NET_MAX_RX == 65536 && NET_MAX_WAIT_US == 1_000_000);
    assert!(NET_MAX_BATCH == 262144 && NET_MAX_BATCH >= NET_MAX_TX && NET_MAX_BATCH >= NET_MAX_RX);
    assert!(REQUEST_CALL == 1 && REQUEST_GROW_INPUT == 2);
    assert!(STATUS_OK == 0 && STATUS_OUT_OF_MEMORY == 1 && STATUS_BAD_REQUEST == 2);
    assert!(STATUS_GUEST_ERROR == 3);
    assert!(ERROR_BAD_INPUT == u32::MAX && ERROR_BAD_OUTPUT == u32::MAX - 1);
    assert!(HOST_CALL_OK == 0 && HOST_CALL_TOO_SMALL == 1 && HOST_CALL_UNKNOWN == 2);
    assert!(HOST_CALL_FAILED == 3 && HOST_CALL_NO_RESULT == 4);
    assert!(PRESERVE_OK == 0 && PRESERVE_OUT_OF_RANGE == 1 && PRESERVE_TOO_LARGE == 2);
    assert!(GARBAGE_UNREPORTED == u64::MAX);
    assert!(MAX_FUNCTION_NAME == 256 && MAX_FUNCTIONS == 4096);
    assert!(GUEST_FLAG_RESETS_VECTOR_STATE == 1);
};

// `from_u32` is the inverse of the discriminants above.
const _: () = {
    let mut nr = 0;
    while nr < 32 {
        if let Some(h) = Hypercall::from_u32(nr) {
            assert!(h as u32 == nr);
        }
        nr += 1;
    }
};
