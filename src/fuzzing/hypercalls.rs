//! Drives hypercall handling against a real VM with arbitrary guest
//! behaviour, for the `hypercalls` fuzz target and the test that replays its
//! corpus. Not a stable API.
//!
//! The guest is `guests/rawguest`, which executes a script of little-endian
//! `u64` words read from its scratch disk (see its source for the opcodes).
//! [`run_hypercall_script`] turns arbitrary bytes into such a disk:
//!
//! | bytes | meaning                                                        |
//! |-------|----------------------------------------------------------------|
//! | 0     | flags: [`FLAG_READY`], memory size ([`MEMORY_SIZES`], bits 1–2), [`FLAG_RESETS_VECTOR_STATE`], rounds (bits 4–5, 1 + value), [`FLAG_INVOKE_INTO`] |
//! | 1     | the host's call plan: bits 0–1 the function the first round calls (0 `fuzz`, 1 `innocent`, 2 an unknown name, 3 an exported name), bits 2–4 its input length ([`INPUT_LENGTHS`]); the whole byte seeds the later rounds' choices |
//! | 2..   | script words; with [`FLAG_READY`] they run as exported function 0 (`fuzz`), otherwise from the first instruction of init |
//!
//! With [`FLAG_READY`] the script is preceded by a well-formed `Ready`
//! (functions `fuzz` = 0 and `innocent` = 1, the input buffer at
//! [`DISK_INPUT`]) and a dispatch on the requested function index, so
//! mutations start past init; `innocent` answers `innocent`. Without it,
//! the script words are the whole program. Either way the disk holds a
//! fixed data region (names, messages, outputs) at the offsets given by the
//! `DISK_*` constants, so scripts can point at them with rawguest's
//! "disk address + offset" opcode.
//!
//! Every input either fails to boot with a typed error or runs a few rounds
//! of calls, each followed by [`VmInstance::restore_in_place`] to the ready
//! snapshot. The invariants are checked with panics, which is what a fuzzer
//! reports: see [`run_hypercall_script`].

use std::collections::BTreeSet;
use std::mem::offset_of;
use std::path::PathBuf;
use std::time::Duration;

use crate::abi::{self, AbiPage, Hypercall};
use crate::snapshot::Snapshot;
use crate::vm::{layout, GuestProgram, ScratchDisk, VmConfig, VmError, VmState};
use crate::VmInstance;

/// Flag bit: prepend a well-formed `Ready` and a function dispatch.
pub const FLAG_READY: u8 = 1;
/// Flag bit: the prepended `Ready` claims
/// [`abi::GUEST_FLAG_RESETS_VECTOR_STATE`] (which rawguest does not honour).
pub const FLAG_RESETS_VECTOR_STATE: u8 = 1 << 3;
/// Flag bit: call with `invoke_into` and a small output buffer.
pub const FLAG_INVOKE_INTO: u8 = 1 << 6;
/// Guest memory sizes, chosen by flag bits 1–2.
pub const MEMORY_SIZES: [u64; 4] = [6 << 20, 8 << 20, 16 << 20, 64 << 20];

/// Size of the disk image (the VM rounds it up to 2 MiB).
pub const DISK_BYTES: usize = 0x1_0000;
/// Most script words, prefix included (they end where the data begins).
pub const MAX_WORDS: usize = DISK_DATA as usize / 8;
/// Disk offset of the data region.
pub const DISK_DATA: u64 = 0x1000;
/// Disk offset of the function table the prepended `Ready` reports
/// (`fuzz`, `innocent`; absolute addresses).
pub const DISK_TABLE: u64 = DISK_DATA;
/// Disk offset of the name `fuzz` (4 bytes).
pub const DISK_NAME_FUZZ: u64 = DISK_DATA + 0x100;
/// Disk offset of the name `innocent` (8 bytes).
pub const DISK_NAME_INNOCENT: u64 = DISK_DATA + 0x110;
/// Disk offset of the host function name `echo` (4 bytes).
pub const DISK_NAME_ECHO: u64 = DISK_DATA + 0x120;
/// Disk offset of the host function name `blob` (4 bytes).
pub const DISK_NAME_BLOB: u64 = DISK_DATA + 0x130;
/// Disk offset of the output of `innocent` (`innocent`, 8 bytes).
pub const DISK_INNOCENT_OUT: u64 = DISK_DATA + 0x200;
/// Disk offset of 16 bytes that are not UTF-8.
pub const DISK_NOT_UTF8: u64 = DISK_DATA + 0x300;
/// Disk offset of a long text (`x` repeated, [`TEXT_LEN`] bytes).
pub const DISK_TEXT: u64 = DISK_DATA + 0x400;
/// Length of the text at [`DISK_TEXT`].
pub const TEXT_LEN: u64 = 0x800;
/// Disk offset of the input buffer the prepended `Ready` reports.
pub const DISK_INPUT: u64 = 0x4000;
/// Capacity of that input buffer.
pub const INPUT_CAP: u64 = 0x1000;
/// Disk offset of rawguest's string I/O scratch area.
pub const DISK_SCRATCH: u64 = 0x8000;

/// Per-call timeout: short, so scripts that loop cost little.
pub const TIMEOUT: Duration = Duration::from_millis(25);
/// Largest output a call may return.
pub const MAX_OUTPUT: u64 = 0x1800;
/// Host-call input and result limits.
pub const HOST_CALL_LIMITS: (u64, u64) = (512, 256);
/// Longest guest message copied.
pub const MAX_MESSAGE: u64 = 64;
/// Guest log bytes per call.
pub const LOG_BUDGET: u64 = 128;
/// Largest total of preserved regions.
pub const MAX_PRESERVED: u64 = 0x2000;
/// Length of the result of the host function `blob`.
pub const BLOB_LEN: usize = 200;

/// A name no guest data declares, to call as an unknown function.
const UNKNOWN_NAME: &str = "no-such-function";

/// Input lengths a round chooses from: empty, small, exactly the input
/// buffer, one past it (a grow request), and larger than the whole disk
/// scratch. Input bytes repeat the script bytes.
pub const INPUT_LENGTHS: [usize; 8] = [0, 1, 8, 64, 0x1000, 0x1001, 0x2800, 0x4_0000];

/// Path of the built `rawguest` program.
pub fn rawguest_path() -> PathBuf {
    PathBuf::from(env!("SNAPVM_GUESTS_DIR")).join("rawguest")
}

/// What one input did, for corpus statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Guest function calls made (unknown names included).
    pub calls: u32,
    /// Calls that returned an output.
    pub succeeded: u32,
    /// Calls that failed and poisoned the VM.
    pub poisoned: u32,
    /// Calls that failed and left the VM ready.
    pub refused: u32,
    /// Successful in-place restores.
    pub restores: u32,
    /// In-place restores that failed (the run stops there).
    pub restore_failures: u32,
    /// `innocent` calls whose output was checked after a reset.
    pub isolation_checks: u32,
}

/// Flags, memory size and round count decoded from the first byte.
#[derive(Clone, Copy, Debug)]
struct Flags {
    ready: bool,
    memory_size: u64,
    resets_vector_state: bool,
    rounds: u32,
    invoke_into: bool,
}

impl Flags {
    fn decode(byte: u8) -> Self {
        Self {
            ready: byte & FLAG_READY != 0,
            memory_size: MEMORY_SIZES[usize::from((byte >> 1) & 3)],
            resets_vector_state: byte & FLAG_RESETS_VECTOR_STATE != 0,
            rounds: 1 + u32::from((byte >> 4) & 3),
            invoke_into: byte & FLAG_INVOKE_INTO != 0,
        }
    }
}

/// The words [`FLAG_READY`] puts before the script: a well-formed `Ready`
/// followed by a dispatch; function 0 (`fuzz`) continues at the word after
/// the returned prefix, function 1 (`innocent`) answers `innocent`.
pub fn ready_prefix(resets_vector_state: bool) -> Vec<u64> {
    let abi = |w: &mut Vec<u64>, field: usize, value: u64| w.extend([1, field as u64, value]);
    let abi_disk = |w: &mut Vec<u64>, field: usize, add: u64| w.extend([10, field as u64, add]);
    let mut w = Vec::new();
    let version = u64::from(abi::ABI_VERSION) | (u64::from(abi::ABI_VERSION) << 32);
    abi(&mut w, offset_of!(AbiPage, version), version);
    abi_disk(&mut w, offset_of!(AbiPage, func_table), DISK_TABLE);
    abi(&mut w, offset_of!(AbiPage, func_count), 2);
    abi_disk(&mut w, offset_of!(AbiPage, input_buf), DISK_INPUT);
    abi(&mut w, offset_of!(AbiPage, input_cap), INPUT_CAP);
    if resets_vector_state {
        let flag = abi::GUEST_FLAG_RESETS_VECTOR_STATE;
        abi(&mut w, offset_of!(AbiPage, guest_flags), flag);
    }
    w.extend([3, Hypercall::Ready as u64]);
    let dispatch = w.len() as u64;
    let innocent = dispatch + 4;
    w.extend([11, 2, 0, innocent]);
    abi_disk(&mut w, offset_of!(AbiPage, output_ptr), DISK_INNOCENT_OUT);
    abi(&mut w, offset_of!(AbiPage, output_len), 8);
    abi(&mut w, offset_of!(AbiPage, status), abi::STATUS_OK);
    w.extend([3, Hypercall::Done as u64, 9, dispatch]);
    let fuzz = w.len() as u64;
    w[dispatch as usize + 2] = fuzz;
    w
}

/// The disk image for `words` in a VM of `memory_size` bytes.
fn disk_image(words: &[u64], memory_size: u64) -> Vec<u8> {
    let mut disk = vec![0u8; DISK_BYTES];
    let mut put = |offset: u64, bytes: &[u8]| {
        disk[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    };
    let table: Vec<u8> = [
        memory_size + DISK_NAME_FUZZ,
        4,
        memory_size + DISK_NAME_INNOCENT,
        8,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect();
    put(DISK_TABLE, &table);
    put(DISK_NAME_FUZZ, b"fuzz");
    put(DISK_NAME_INNOCENT, b"innocent");
    put(DISK_NAME_ECHO, b"echo");
    put(DISK_NAME_BLOB, b"blob");
    put(DISK_INNOCENT_OUT, b"innocent");
    put(
        DISK_NOT_UTF8,
        &[
            0xFF, 0xFE, 0xC0, 0x80, 0xED, 0xA0, 0x80, 0xF8, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    put(DISK_TEXT, &[b'x'; TEXT_LEN as usize]);
    for (i, w) in words.iter().enumerate().take(MAX_WORDS) {
        put(i as u64 * 8, &w.to_le_bytes());
    }
    disk
}

/// The config every input runs with.
fn config(program: &GuestProgram, flags: Flags, disk: Vec<u8>) -> VmConfig {
    VmConfig::new(program.clone())
        .memory_size(flags.memory_size)
        .scratch_disk(ScratchDisk::from_bytes(disk))
        .timeout(Some(TIMEOUT))
        .dirty_tracking(true)
        .max_output(MAX_OUTPUT)
        .host_call_limits(HOST_CALL_LIMITS.0, HOST_CALL_LIMITS.1)
        .max_message(MAX_MESSAGE)
        .log_budget(LOG_BUDGET)
        .max_preserved(MAX_PRESERVED)
        .host_function("echo", |input| Ok(input.to_vec()))
        .host_function("blob", |_| Ok(vec![0xA5; BLOB_LEN]))
}

/// xorshift64: the host's call plan, reproducible from the input.
struct Plan(u64);

impl Plan {
    fn next(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }

    /// An index below `len` (which is not zero).
    fn below(&mut self, len: usize) -> usize {
        (self.next() % len as u64) as usize
    }
}

/// The memory only supervisor code may touch: the null guard page, and the
/// system area up to and including the stack guard page. The ABI page
/// between them is the guest's and the host's.
const PROTECTED: [(u64, u64); 2] = [
    (0, abi::ABI_PAGE_ADDR),
    (abi::SYSTEM_AREA_START, abi::STACK_BOTTOM),
];

/// The CPL0 stacks (exception frames are pushed there on every fault).
const CPL0_STACKS: (u64, u64) = (layout::RSP0 - 0x2000, layout::IST1);

/// Accessed and dirty bits of a page-table entry, which the CPU sets as
/// guest code touches memory.
const ACCESSED_DIRTY: u64 = (1 << 5) | (1 << 6);

/// A copy of the protected memory of a VM.
struct Protected(Vec<Vec<u8>>);

impl Protected {
    fn read(vm: &VmInstance) -> Self {
        Self(
            PROTECTED
                .iter()
                .map(|&(start, end)| {
                    let mut bytes = vec![0; (end - start) as usize];
                    vm.read_memory(start, &mut bytes)
                        .unwrap_or_else(|e| panic!("reading {start:#x}..{end:#x}: {e}"));
                    bytes
                })
                .collect(),
        )
    }

    /// The first difference from `boot`, as (guest address, boot byte, now
    /// byte). With `after_call`, differences the CPU itself makes while
    /// guest code runs are allowed: accessed/dirty bits in page tables, and
    /// (when `fault_possible`) exception frames on the CPL0 stacks.
    fn first_difference(
        &self,
        boot: &Self,
        memory_size: u64,
        after_call: bool,
        fault_possible: bool,
    ) -> Option<(u64, u8, u8)> {
        let page_tables: Vec<u64> = layout::page_table_pages(memory_size).collect();
        let page = abi::PAGE_SIZE as usize;
        for ((&(start, _), now), was) in PROTECTED.iter().zip(&self.0).zip(&boot.0) {
            // Whole pages first (a plain comparison), bytes only where a
            // page differs.
            for (p, (now, was)) in now.chunks(page).zip(was.chunks(page)).enumerate() {
                if now == was {
                    continue;
                }
                let page_addr = start + (p * page) as u64;
                let is_page_table = page_tables.contains(&(page_addr / abi::PAGE_SIZE));
                for (i, (&n, &w)) in now.iter().zip(was).enumerate() {
                    if n == w {
                        continue;
                    }
                    let addr = page_addr + i as u64;
                    if after_call && is_page_table {
                        let entry = i & !7;
                        let word = |b: &[u8]| {
                            u64::from_le_bytes(b[entry..entry + 8].try_into().expect("8 bytes"))
                        };
                        if (word(now) ^ word(was)) & !ACCESSED_DIRTY == 0 {
                            continue;
                        }
                    }
                    if after_call
                        && fault_possible
                        && (CPL0_STACKS.0..CPL0_STACKS.1).contains(&addr)
                    {
                        continue;
                    }
                    return Some((addr, w, n));
                }
            }
        }
        None
    }
}

/// Whether guest code may have raised an exception during a call that
/// ended with `result` (the CPU then wrote a frame on a CPL0 stack).
fn fault_possible<T>(result: &Result<T, VmError>) -> bool {
    match result {
        Ok(_) => false,
        Err(e) => !matches!(
            e,
            VmError::BadHypercall { .. }
                | VmError::UnknownHypercall { .. }
                | VmError::GuestPanic { .. }
                | VmError::GuestAbort { .. }
                | VmError::GuestOutOfMemory { .. }
                | VmError::UnknownFunction { .. }
                | VmError::InputTooLarge { .. }
                | VmError::OutputTooLarge { .. }
                | VmError::OutputBufferTooSmall { .. }
        ),
    }
}

/// Runs fuzz input `data` (see the module docs for its format) against a
/// VM running `program` (rawguest).
///
/// Returns the boot error if the VM does not reach `Ready` or its ready
/// snapshot cannot be taken. Panics — which is what a fuzzer reports — when
/// an invariant breaks:
/// - the supervisor-only memory (null guard, system area, stack guard)
///   differs after a call from what it was at boot, beyond what the CPU
///   itself writes there (accessed/dirty bits, exception frames), or
///   differs at all after a reset: the host never writes there for a guest;
/// - a call's result disagrees with the VM's state: an error that poisons
///   must leave it [`VmState::Poisoned`] and make the next call fail with
///   [`VmError::Poisoned`]; success and other errors must leave it ready;
/// - a successful [`VmInstance::restore_in_place`] does not leave it ready
///   with the ready snapshot's functions, or a failed one leaves it ready;
/// - an output exceeds the configured limit, an exported function is
///   reported unknown (or an unknown one is called);
/// - with [`FLAG_READY`], `innocent` called after a reset does not answer
///   `innocent` (the previous request leaked into the next one), unless the
///   script preserved memory across resets or claims
///   [`FLAG_RESETS_VECTOR_STATE`] without honouring it.
pub fn run_hypercall_script(program: &GuestProgram, data: &[u8]) -> Result<Summary, crate::Error> {
    let (&flag_byte, rest) = data.split_first().unwrap_or((&0, &[]));
    let (&plan_byte, script) = rest.split_first().unwrap_or((&0, &[]));
    let flags = Flags::decode(flag_byte);
    let mut words = if flags.ready {
        ready_prefix(flags.resets_vector_state)
    } else {
        Vec::new()
    };
    words.extend(
        script
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .take(MAX_WORDS.saturating_sub(words.len())),
    );
    let config = config(program, flags, disk_image(&words, flags.memory_size));
    let mut vm = VmInstance::new(&config)?;
    assert_eq!(vm.state(), VmState::Ready, "a VM fresh from init is ready");
    let boot = Protected::read(&vm);
    let ready = vm.snapshot()?;
    let functions: BTreeSet<String> = vm.functions().map(str::to_owned).collect();
    let mut run = Run {
        vm,
        ready,
        boot,
        functions,
        flags,
        plan_byte,
        plan: Plan((0x9E37_79B9_7F4A_7C15 ^ u64::from(plan_byte) ^ ((data.len() as u64) << 8)) | 1),
        input_seed: script,
        summary: Summary::default(),
        tainted: flags.resets_vector_state || !flags.ready,
    };
    for round in 0..flags.rounds {
        if !run.round(round) {
            break;
        }
    }
    // A last isolation check: after whatever the rounds did, a reset VM
    // answers an innocent request innocently.
    if run.summary.restore_failures == 0 {
        run.isolation_check();
    }
    Ok(run.summary)
}

/// The state of one input's run.
struct Run<'a> {
    vm: VmInstance,
    ready: Snapshot,
    boot: Protected,
    functions: BTreeSet<String>,
    flags: Flags,
    plan_byte: u8,
    plan: Plan,
    input_seed: &'a [u8],
    summary: Summary,
    /// Whether `innocent` may legitimately answer otherwise after a reset.
    tainted: bool,
}

impl Run<'_> {
    /// One call and one reset; false when the VM cannot go on.
    fn round(&mut self, round: u32) -> bool {
        let exported: Vec<String> = self.functions.iter().cloned().collect();
        let (choice, len) = if round == 0 {
            (self.plan_byte & 3, (self.plan_byte >> 2) & 7)
        } else {
            ((self.plan.next() % 4) as u8, (self.plan.next() % 8) as u8)
        };
        let name = match choice {
            0 => "fuzz".to_owned(),
            1 => "innocent".to_owned(),
            2 => UNKNOWN_NAME.to_owned(),
            _ if exported.is_empty() => UNKNOWN_NAME.to_owned(),
            _ => exported[self.plan.below(exported.len())].clone(),
        };
        let len = INPUT_LENGTHS[usize::from(len)];
        let input: Vec<u8> = if self.input_seed.is_empty() {
            vec![round as u8; len]
        } else {
            self.input_seed.iter().copied().cycle().take(len).collect()
        };
        let checks_isolation = !self.tainted && name == "innocent" && len as u64 <= INPUT_CAP;
        self.call(&name, &input, checks_isolation);
        self.reset()
    }

    /// Calls `name`, then checks the VM's state and protected memory.
    fn call(&mut self, name: &str, input: &[u8], checks_isolation: bool) {
        let exported = self.functions.contains(name);
        let result = if self.flags.invoke_into {
            let mut out = [0u8; 16];
            self.vm
                .invoke_into(name, input, &mut out)
                .map(|len| out[..len].to_vec())
        } else {
            self.vm.invoke(name, input)
        };
        self.summary.calls += 1;
        match &result {
            Ok(out) => {
                self.summary.succeeded += 1;
                assert!(
                    out.len() as u64 <= MAX_OUTPUT,
                    "{name}: an output of {} bytes passed the {MAX_OUTPUT}-byte limit",
                    out.len()
                );
                assert!(exported, "{name}: an unknown function returned {out:?}");
                assert_eq!(
                    self.vm.state(),
                    VmState::Ready,
                    "{name}: ready after success"
                );
            }
            Err(e) => self.check_error(name, exported, e),
        }
        if checks_isolation {
            match &result {
                Ok(out) => {
                    assert_eq!(
                        out.as_slice(),
                        b"innocent",
                        "innocent after a reset saw a previous request"
                    );
                    self.summary.isolation_checks += 1;
                }
                // The wall-clock timeout may fire on a busy host.
                Err(VmError::Timeout { .. }) => {}
                Err(e) => panic!("innocent after a reset failed: {e}"),
            }
        }
        if !self.vm.preserved_regions().is_empty() {
            self.tainted = true;
        }
        let now = Protected::read(&self.vm);
        let diff = now.first_difference(
            &self.boot,
            self.flags.memory_size,
            true,
            fault_possible(&result),
        );
        if let Some((addr, was, is)) = diff {
            panic!(
                "{name}: supervisor-only memory at {addr:#x} changed from {was:#04x} to {is:#04x} \
                 during a call that ended with {result:?}"
            );
        }
    }

    fn check_error(&mut self, name: &str, exported: bool, e: &VmError) {
        let text = e.to_string();
        assert!(
            !text.is_empty(),
            "{name}: an error without a message: {e:?}"
        );
        match e {
            VmError::UnknownFunction { .. } => {
                assert!(!exported, "{name}: exported, but reported unknown")
            }
            VmError::Poisoned { .. } => panic!("{name}: a VM reset to ready was poisoned: {e}"),
            _ => {}
        }
        if e.poisons() {
            self.summary.poisoned += 1;
            assert_eq!(
                self.vm.state(),
                VmState::Poisoned,
                "{name}: still ready after {e}"
            );
            match self.vm.invoke(name, b"") {
                Err(VmError::Poisoned { .. }) => {}
                other => panic!("{name}: a VM poisoned by {e} answered {other:?}"),
            }
        } else {
            self.summary.refused += 1;
            assert_eq!(
                self.vm.state(),
                VmState::Ready,
                "{name}: poisoned by {e}, which does not poison"
            );
        }
    }

    /// Rewinds to the ready snapshot; false if that failed.
    fn reset(&mut self) -> bool {
        match self.vm.restore_in_place(&self.ready) {
            Ok(()) => {
                self.summary.restores += 1;
                assert_eq!(self.vm.state(), VmState::Ready, "ready after a restore");
                let functions: BTreeSet<String> = self.vm.functions().map(str::to_owned).collect();
                assert_eq!(functions, self.functions, "functions after a restore");
                let now = Protected::read(&self.vm);
                let diff = now.first_difference(&self.boot, self.flags.memory_size, false, false);
                if let Some((addr, was, is)) = diff {
                    panic!(
                        "supervisor-only memory at {addr:#x} is {is:#04x} after a restore, \
                         {was:#04x} at boot"
                    );
                }
                true
            }
            Err(e) => {
                self.summary.restore_failures += 1;
                assert!(
                    !e.to_string().is_empty(),
                    "a restore error without a message"
                );
                assert_eq!(
                    self.vm.state(),
                    VmState::Poisoned,
                    "ready after a failed restore ({e})"
                );
                match self.vm.invoke("innocent", b"") {
                    Err(VmError::Poisoned { .. }) => {}
                    other => panic!("a VM whose restore failed ({e}) answered {other:?}"),
                }
                false
            }
        }
    }

    /// Calls `innocent` on the reset VM (with [`FLAG_READY`] only).
    fn isolation_check(&mut self) {
        if !self.flags.ready {
            return;
        }
        self.call("innocent", b"", !self.tainted);
        self.reset();
    }
}
