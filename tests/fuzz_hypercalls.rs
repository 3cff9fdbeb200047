//! The `hypercalls` fuzz target's corpus, run as a normal test: every file
//! in `fuzz/corpus/hypercalls/` goes through
//! `snapvm::fuzzing::hypercalls::run_hypercall_script` against real KVM, followed
//! by a bounded, deterministic run of mutated corpus entries.
//!
//! The seed files are written by [`seeds`]: run
//! `SNAPVM_REGENERATE_CORPUS=1 cargo test --test fuzz_hypercalls seed_corpus`
//! after changing them. Inputs a fuzzer found may sit beside them.

mod common;

use std::mem::offset_of;
use std::path::{Path, PathBuf};
use std::time::Instant;

use snapvm::abi::{self, AbiPage, Hypercall};
use snapvm::fuzzing::hypercalls::{
    self as fuzzing, Summary, BLOB_LEN, DISK_INNOCENT_OUT, DISK_INPUT, DISK_NAME_BLOB,
    DISK_NAME_ECHO, DISK_NAME_FUZZ, DISK_NAME_INNOCENT, DISK_NOT_UTF8, DISK_TABLE, DISK_TEXT,
    FLAG_INVOKE_INTO, FLAG_READY, FLAG_RESETS_VECTOR_STATE, INPUT_CAP, MAX_OUTPUT, MEMORY_SIZES,
    TEXT_LEN,
};
use snapvm::GuestProgram;

/// A disk offset for the host to write results to, clear of the script,
/// the data, the input buffer and rawguest's string I/O area.
const DISK_OUT: u64 = 0x9000;
/// The scratch disk is 2 MiB (the 64 KiB image rounded up).
const DISK_SIZE: u64 = 2 << 20;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/hypercalls")
}

fn program() -> GuestProgram {
    GuestProgram::from_file(fuzzing::rawguest_path()).expect("rawguest is built")
}

/// Builds one fuzz input: flag byte, plan byte, script words.
#[derive(Clone)]
struct Seed {
    flags: u8,
    plan: u8,
    words: Vec<u64>,
}

impl Seed {
    /// A script run as function `fuzz` after a well-formed `Ready`; the
    /// first round calls `fuzz` with an empty input; `rounds` in all.
    fn ready(rounds: u8) -> Self {
        Self {
            flags: FLAG_READY | ((rounds - 1) << 4),
            plan: 0,
            words: Vec::new(),
        }
    }

    /// A script that is the whole program, init included.
    fn raw(rounds: u8) -> Self {
        Self {
            flags: (rounds - 1) << 4,
            plan: 0,
            words: Vec::new(),
        }
    }

    /// Memory size `MEMORY_SIZES[index]`.
    fn memory(mut self, index: u8) -> Self {
        self.flags = (self.flags & !0b110) | (index << 1);
        self
    }

    fn flag(mut self, flag: u8) -> Self {
        self.flags |= flag;
        self
    }

    /// The first round calls function `choice` (0 fuzz, 1 innocent, 2
    /// unknown, 3 exported) with input length `INPUT_LENGTHS[len]`.
    fn first_call(mut self, choice: u8, len: u8) -> Self {
        self.plan = choice | (len << 2);
        self
    }

    fn memory_size(&self) -> u64 {
        MEMORY_SIZES[usize::from((self.flags >> 1) & 3)]
    }

    /// The guest address of the scratch disk.
    fn disk(&self) -> u64 {
        self.memory_size()
    }

    /// The absolute word index of the next word (for jumps).
    fn here(&self) -> u64 {
        let prefix = if self.flags & FLAG_READY != 0 {
            fuzzing::ready_prefix(self.flags & FLAG_RESETS_VECTOR_STATE != 0).len()
        } else {
            0
        };
        (prefix + self.words.len()) as u64
    }

    fn op(mut self, words: &[u64]) -> Self {
        self.words.extend_from_slice(words);
        self
    }

    fn abi(self, field: usize, value: u64) -> Self {
        self.op(&[1, field as u64, value])
    }

    fn abi_disk(self, field: usize, add: u64) -> Self {
        self.op(&[10, field as u64, add])
    }

    fn arg(self, i: usize, value: u64) -> Self {
        self.abi(offset_of!(AbiPage, args) + 8 * i, value)
    }

    fn arg_disk(self, i: usize, add: u64) -> Self {
        self.abi_disk(offset_of!(AbiPage, args) + 8 * i, add)
    }

    fn args(self, values: &[u64]) -> Self {
        values
            .iter()
            .enumerate()
            .fold(self, |s, (i, &v)| s.arg(i, v))
    }

    fn hypercall(self, nr: u32) -> Self {
        self.op(&[3, u64::from(nr)])
    }

    /// A host call of `name` (a disk offset, 4 bytes) with input
    /// `(disk offset, len)` and output `(disk offset, cap)`.
    fn host_call(self, name: u64, input: (u64, u64), out: (u64, u64)) -> Self {
        self.arg_disk(0, name)
            .arg(1, 4)
            .arg_disk(2, input.0)
            .arg(3, input.1)
            .arg_disk(4, out.0)
            .arg(5, out.1)
            .hypercall(Hypercall::HostCall as u32)
    }

    /// Answers the request with `len` bytes at disk offset `at`.
    fn done_with(self, at: u64, len: u64) -> Self {
        self.abi_disk(offset_of!(AbiPage, output_ptr), at)
            .abi(offset_of!(AbiPage, output_len), len)
            .abi(offset_of!(AbiPage, status), abi::STATUS_OK)
            .hypercall(Hypercall::Done as u32)
    }

    /// A raw `Ready` with the given table and input buffer.
    fn raw_ready(self, table: (u64, u64), input: (u64, u64)) -> Self {
        let version = (u64::from(abi::ABI_VERSION) << 32) | u64::from(abi::ABI_VERSION);
        self.abi(offset_of!(AbiPage, version), version)
            .abi(offset_of!(AbiPage, func_table), table.0)
            .abi(offset_of!(AbiPage, func_count), table.1)
            .abi(offset_of!(AbiPage, input_buf), input.0)
            .abi(offset_of!(AbiPage, input_cap), input.1)
            .hypercall(Hypercall::Ready as u32)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = vec![self.flags, self.plan];
        out.extend(self.words.iter().flat_map(|w| w.to_le_bytes()));
        out
    }
}

/// Argument values at the extremes, for a VM whose disk starts at `disk`.
fn extremes(disk: u64) -> [u64; 12] {
    [
        0,
        1,
        abi::ABI_PAGE_ADDR,
        0x2000, // GDT
        0x3000, // IDT
        0xA000, // PML4
        disk,   // the end of guest memory proper
        disk + DISK_SIZE,
        disk + DISK_SIZE - 1,
        u64::MAX,
        u64::MAX - 0xFFF, // wraps when added to any address
        1 << 63,
    ]
}

/// The seed corpus, by file name.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Seed)> = Vec::new();
    let mut add = |name: &str, seed: Seed| seeds.push((name.to_string(), seed));

    add("ready-empty", Seed::ready(4));
    add("ready-innocent", Seed::ready(4).first_call(1, 3));
    add("unknown-function", Seed::ready(2).first_call(2, 0));
    add(
        "ready-vector-flag-64mib",
        Seed::ready(3).memory(3).flag(FLAG_RESETS_VECTOR_STATE),
    );

    // Every hypercall number, known or not, with arguments at the extremes.
    for nr in 0..=10u32 {
        let s = Seed::ready(2).memory((nr % 4) as u8);
        let values = extremes(s.disk());
        let args: Vec<u64> = (0..8)
            .map(|i| values[(i + nr as usize * 5) % values.len()])
            .collect();
        add(
            &format!("hypercall-{nr:02}-extremes"),
            s.args(&args).hypercall(nr),
        );
    }

    // Log: a long text (truncated), past the budget, any level, not UTF-8,
    // then from the system area.
    let mut s = Seed::ready(2);
    for level in [3, 0, 5, u64::MAX] {
        s = s
            .arg(0, level)
            .arg_disk(1, DISK_TEXT)
            .arg(2, TEXT_LEN)
            .hypercall(Hypercall::Log as u32);
    }
    s = s
        .arg_disk(1, DISK_NOT_UTF8)
        .arg(2, 16)
        .hypercall(Hypercall::Log as u32);
    add(
        "log-budget-then-system-area",
        s.arg(1, 0x3000).arg(2, 64).hypercall(Hypercall::Log as u32),
    );

    // Host calls: echo (its result answers the call), oversized input and
    // result, unknown names, and buffers the guest cannot access.
    add(
        "hostcall-echo",
        Seed::ready(3)
            .host_call(DISK_NAME_ECHO, (DISK_TEXT, 100), (DISK_OUT, 0x1000))
            .done_with(DISK_OUT, 100),
    );
    add(
        "hostcall-limits-and-unknown-name",
        Seed::ready(2)
            .host_call(DISK_NAME_ECHO, (DISK_TEXT, 0x1000), (DISK_OUT, 0x1000))
            .host_call(DISK_NAME_ECHO, (DISK_TEXT, 300), (DISK_OUT, 0x1000))
            .host_call(DISK_NAME_FUZZ, (DISK_TEXT, 1), (DISK_OUT, 1))
            .arg(1, u64::MAX)
            .hypercall(Hypercall::HostCall as u32),
    );
    add(
        "hostcall-blob-then-hostresult",
        Seed::ready(3)
            .host_call(DISK_NAME_BLOB, (DISK_TEXT, 0), (DISK_OUT, 16))
            .arg_disk(0, DISK_OUT)
            .arg(1, 8)
            .hypercall(Hypercall::HostResult as u32)
            .arg(1, 0x1000)
            .hypercall(Hypercall::HostResult as u32)
            .hypercall(Hypercall::HostResult as u32)
            .done_with(DISK_OUT, BLOB_LEN as u64),
    );
    add(
        "hostcall-out-into-pml4",
        Seed::ready(2)
            .host_call(DISK_NAME_BLOB, (DISK_TEXT, 0), (0, 0))
            .arg(4, 0xA000)
            .arg(5, 0x1000)
            .hypercall(Hypercall::HostCall as u32),
    );
    add(
        "hostresult-into-gdt",
        Seed::ready(2)
            .host_call(DISK_NAME_BLOB, (DISK_TEXT, 0), (DISK_OUT, 0))
            .arg(0, 0x2000)
            .arg(1, 0x1000)
            .hypercall(Hypercall::HostResult as u32),
    );
    add(
        "hostcall-name-in-abi-page",
        Seed::ready(2)
            .host_call(DISK_NAME_ECHO, (DISK_TEXT, 4), (DISK_OUT, 16))
            .arg(0, abi::ABI_PAGE_ADDR + offset_of!(AbiPage, args) as u64)
            .arg(1, 8)
            .hypercall(Hypercall::HostCall as u32),
    );
    let s = Seed::ready(2).memory(3);
    let end = s.disk() + DISK_SIZE;
    add(
        "hostcall-echo-at-end-of-memory",
        s.host_call(DISK_NAME_ECHO, (DISK_TEXT, 8), (DISK_OUT, 8))
            .arg(4, end - 8)
            .hypercall(Hypercall::HostCall as u32)
            .arg(4, end - 4)
            .hypercall(Hypercall::HostCall as u32),
    );

    // Panic and abort messages.
    add(
        "panic-with-location",
        Seed::ready(2)
            .arg_disk(0, DISK_TEXT)
            .arg(1, TEXT_LEN)
            .arg_disk(2, DISK_NAME_INNOCENT)
            .arg(3, 8)
            .arg(4, u64::MAX)
            .arg(5, u64::MAX)
            .hypercall(Hypercall::Panic as u32),
    );
    add(
        "panic-file-in-idt",
        Seed::ready(2)
            .arg_disk(0, DISK_TEXT)
            .arg(1, 4)
            .arg(2, 0x3000)
            .arg(3, 16)
            .hypercall(Hypercall::Panic as u32),
    );
    add(
        "abort-not-utf8",
        Seed::ready(2)
            .arg_disk(0, DISK_NOT_UTF8)
            .arg(1, 16)
            .hypercall(Hypercall::Abort as u32),
    );

    // Preserve: a heap region (kept across resets), past the limit, and a
    // wrapping one at the end of memory.
    let s = Seed::ready(4);
    let top = s.memory_size();
    add(
        "preserve-heap-then-limits",
        s.args(&[0x30_0000, 0x1000])
            .hypercall(Hypercall::Preserve as u32)
            .op(&[2, 0x30_0010, 0x4142_4344])
            .args(&[0x30_0000, 1 << 20])
            .hypercall(Hypercall::Preserve as u32)
            .args(&[top - 8, u64::MAX - 4])
            .hypercall(Hypercall::Preserve as u32)
            .args(&[top - 8, 8])
            .hypercall(Hypercall::Preserve as u32),
    );
    add(
        "out-of-memory",
        Seed::ready(2)
            .args(&[u64::MAX])
            .abi(offset_of!(AbiPage, heap_used), u64::MAX)
            .hypercall(Hypercall::OutOfMemory as u32),
    );

    // Outputs: across the end of memory, over the limit, not OK, and too
    // large for an `invoke_into` buffer.
    let s = Seed::ready(2);
    add("output-across-end-of-memory", s.done_with(DISK_SIZE - 4, 8));
    add(
        "output-over-limit",
        Seed::ready(2).done_with(DISK_TEXT, MAX_OUTPUT + 1),
    );
    add(
        "output-bad-status",
        Seed::ready(2)
            .abi(offset_of!(AbiPage, status), 7)
            .hypercall(Hypercall::Done as u32),
    );
    add(
        "output-in-abi-page",
        Seed::ready(2)
            .abi(offset_of!(AbiPage, output_ptr), abi::ABI_PAGE_ADDR)
            .abi(offset_of!(AbiPage, output_len), 8)
            .hypercall(Hypercall::Done as u32),
    );
    add(
        "invoke-into-small-buffer",
        Seed::ready(3)
            .flag(FLAG_INVOKE_INTO)
            .done_with(DISK_TEXT, 100),
    );

    // Grow requests (the first call's input is one byte past the buffer),
    // answered with the system area, a smaller buffer, out of memory, and
    // a wrapping capacity.
    let grow = |input_buf: Option<u64>, cap: u64, status: u64| {
        let s = Seed::ready(2).first_call(0, 5);
        let s = match input_buf {
            Some(addr) => s.abi(offset_of!(AbiPage, input_buf), addr),
            None => s.abi_disk(offset_of!(AbiPage, input_buf), DISK_INPUT),
        };
        s.abi(offset_of!(AbiPage, input_cap), cap)
            .abi(offset_of!(AbiPage, status), status)
            .hypercall(Hypercall::Done as u32)
    };
    add(
        "grow-into-pml4",
        grow(Some(0xA000), 1 << 20, abi::STATUS_OK),
    );
    add("grow-smaller", grow(None, INPUT_CAP, abi::STATUS_OK));
    add(
        "grow-out-of-memory",
        grow(None, 0, abi::STATUS_OUT_OF_MEMORY),
    );
    add("grow-wrapping", grow(None, u64::MAX, abi::STATUS_OK));

    // Port reads, string I/O, privileged instructions.
    add("port-read", Seed::ready(2).op(&[4]));
    add("rep-insb-huge", Seed::ready(2).op(&[5, u64::MAX]));
    add(
        "outsd-done",
        Seed::ready(3).op(&[6, Hypercall::Done as u64]),
    );
    add(
        "rep-outsd-log",
        Seed::ready(2).op(&[7, 8, Hypercall::Log as u64]),
    );
    for (kind, what) in [(0, "wrmsr"), (3, "mov-cr3"), (4, "hlt"), (6, "swapgs")] {
        add(&format!("privileged-{what}"), Seed::ready(2).op(&[8, kind]));
    }

    // Control flow: a loop (timeout), Ready again, a jump off the script.
    let s = Seed::ready(2);
    let here = s.here();
    add("loop-timeout", s.op(&[9, here]));
    add("ready-again", Seed::ready(2).op(&[9, 0]));
    add("jump-far", Seed::ready(2).op(&[9, u64::MAX]));
    add("dispatch-huge-count", Seed::ready(2).op(&[11, u64::MAX, 0]));

    // Memory writes: the GDT (a fault), rawguest's own code, the input
    // buffer's description in the ABI page.
    add("write-gdt", Seed::ready(2).op(&[2, 0x2000, 0]));
    add(
        "write-own-code",
        Seed::ready(3).op(&[2, abi::USER_BASE, 0x0B0F_0B0F_0B0F_0B0F]),
    );
    add(
        "rewrite-input-buffer",
        Seed::ready(3)
            .abi(offset_of!(AbiPage, input_buf), 0xA000)
            .abi(offset_of!(AbiPage, input_cap), 0x1000)
            .done_with(DISK_INNOCENT_OUT, 8),
    );

    // Init without the prepended Ready.
    let s = Seed::raw(3);
    let (disk, table) = (s.disk(), s.disk() + DISK_TABLE);
    add(
        "raw-well-formed",
        s.raw_ready((table, 2), (disk + DISK_INPUT, INPUT_CAP)),
    );
    add(
        "raw-done-before-ready",
        Seed::raw(1).hypercall(Hypercall::Done as u32),
    );
    add(
        "raw-table-in-gdt",
        Seed::raw(1).raw_ready((0x2000, 2), (disk + DISK_INPUT, INPUT_CAP)),
    );
    add(
        "raw-table-huge-count",
        Seed::raw(1).raw_ready((table, u64::MAX / 8), (disk + DISK_INPUT, INPUT_CAP)),
    );
    add(
        "raw-input-buffer-in-pml4",
        Seed::raw(1).raw_ready((table, 2), (0xA000, INPUT_CAP)),
    );
    add(
        "raw-input-buffer-wrapping",
        Seed::raw(1).raw_ready((table, 2), (disk + DISK_INPUT, u64::MAX)),
    );
    add(
        "raw-duplicate-names",
        Seed::raw(1)
            .op(&[2, table + 16, disk + DISK_NAME_FUZZ, 2, table + 24, 4])
            .raw_ready((table, 2), (disk + DISK_INPUT, INPUT_CAP)),
    );
    add(
        "raw-name-not-utf8",
        Seed::raw(1)
            .op(&[2, table, disk + DISK_NOT_UTF8])
            .raw_ready((table, 2), (disk + DISK_INPUT, INPUT_CAP)),
    );
    add(
        "raw-abi-mismatch",
        Seed::raw(1)
            .abi(offset_of!(AbiPage, version), 2 << 32)
            .hypercall(Hypercall::Ready as u32),
    );

    seeds
        .into_iter()
        .map(|(name, seed)| (name, seed.bytes()))
        .collect()
}

/// Every corpus file, sorted by name.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir())
        .expect("fuzz/corpus/hypercalls exists")
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("a readable corpus file"))
        })
        .collect();
    files.sort();
    files
}

/// Totals over many inputs.
#[derive(Debug, Default)]
struct Totals {
    inputs: u32,
    boot_errors: u32,
    calls: u32,
    succeeded: u32,
    poisoned: u32,
    refused: u32,
    restores: u32,
    restore_failures: u32,
    isolation_checks: u32,
}

impl Totals {
    fn add(&mut self, result: &Result<Summary, snapvm::Error>) {
        self.inputs += 1;
        match result {
            Ok(s) => {
                self.calls += s.calls;
                self.succeeded += s.succeeded;
                self.poisoned += s.poisoned;
                self.refused += s.refused;
                self.restores += s.restores;
                self.restore_failures += s.restore_failures;
                self.isolation_checks += s.isolation_checks;
            }
            Err(_) => self.boot_errors += 1,
        }
    }
}

#[test]
fn seed_corpus_is_current() {
    let dir = corpus_dir();
    let regenerate = std::env::var_os("SNAPVM_REGENERATE_CORPUS").is_some_and(|v| v == "1");
    if regenerate {
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
    }
    for (name, bytes) in seeds() {
        let path = dir.join(&name);
        if regenerate {
            std::fs::write(&path, &bytes).expect("write a seed");
        } else {
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "seed {name} is missing or stale; run with SNAPVM_REGENERATE_CORPUS=1"
            );
        }
    }
}

#[test]
fn corpus_runs_clean() {
    require_kvm!();
    let program = program();
    let mut totals = Totals::default();
    let start = Instant::now();
    for (name, bytes) in corpus() {
        let result = std::panic::catch_unwind(|| fuzzing::run_hypercall_script(&program, &bytes))
            .unwrap_or_else(|_| panic!("corpus file {name} broke an invariant (see above)"));
        if let Err(e) = &result {
            eprintln!("{name}: {e}");
        }
        totals.add(&result);
    }
    eprintln!("corpus: {totals:?} in {:?}", start.elapsed());
    // The corpus reaches past init, makes calls that succeed, fail and
    // poison, and rewinds.
    assert!(totals.boot_errors > 0 && totals.boot_errors < totals.inputs);
    assert!(totals.succeeded > 0 && totals.poisoned > 0 && totals.refused > 0);
    assert!(totals.restores > 0 && totals.isolation_checks > 0);
}

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Word values worth trying anywhere in a script.
fn interesting(rng: &mut Rng, disk: u64) -> u64 {
    match rng.below(4) {
        0 => extremes(disk)[rng.below(12)],
        1 => rng.below(12) as u64, // opcodes and hypercall numbers
        2 => (disk + rng.below(0x1_0000) as u64) & !7,
        _ => offset_of!(AbiPage, args) as u64 + 8 * rng.below(8) as u64,
    }
}

/// One mutation of `input` (flag byte, plan byte, words), `others` for splicing.
fn mutate(rng: &mut Rng, input: &[u8], others: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = input.to_vec();
    bytes.resize(bytes.len().max(2), 0);
    let disk = MEMORY_SIZES[usize::from((bytes[0] >> 1) & 3)];
    for _ in 0..1 + rng.below(3) {
        let words = (bytes.len() - 2) / 8;
        match rng.below(6) {
            0 => bytes[rng.below(2)] ^= 1 << rng.below(8),
            1 if words > 0 => {
                let at = 2 + 8 * rng.below(words);
                let value = interesting(rng, disk);
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            2 => {
                // Insert a hypercall with a few arguments set.
                let mut op = Vec::new();
                for _ in 0..rng.below(4) {
                    op.extend([
                        1,
                        offset_of!(AbiPage, args) as u64 + 8 * rng.below(8) as u64,
                    ]);
                    op.push(interesting(rng, disk));
                }
                op.extend([3, rng.below(11) as u64]);
                let at = 2 + 8 * rng.below(words + 1);
                let insert: Vec<u8> = op.iter().flat_map(|w| w.to_le_bytes()).collect();
                bytes.splice(at..at, insert);
            }
            3 if words > 0 => bytes.truncate(2 + 8 * rng.below(words)),
            4 => {
                let (_, other) = &others[rng.below(others.len())];
                if other.len() > 2 {
                    bytes.extend_from_slice(&other[2..]);
                }
            }
            _ => {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
        }
    }
    bytes
}

/// Mutants per run; `SNAPVM_FUZZ_INPUTS` and `SNAPVM_FUZZ_SEED` override
/// the count and the seed for a longer exploration.
const INPUTS: usize = 800;

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={text}: {e}")))
}

#[test]
fn mutated_corpus_runs_clean() {
    require_kvm!();
    let inputs = env_number("SNAPVM_FUZZ_INPUTS").map_or(INPUTS, |n| n as usize);
    let seed = env_number("SNAPVM_FUZZ_SEED").unwrap_or(0x5EED_F00D_CAFE_D00D) | 1;
    let program = program();
    let corpus = corpus();
    let mut rng = Rng(seed);
    let mut totals = Totals::default();
    let start = Instant::now();
    for i in 0..inputs {
        let (name, base) = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, base, &corpus);
        let result = std::panic::catch_unwind(|| fuzzing::run_hypercall_script(&program, &input))
            .unwrap_or_else(|_| {
                panic!("mutant {i} of {name} broke an invariant (see above); input: {input:02x?}")
            });
        totals.add(&result);
    }
    eprintln!("mutants: {totals:?} in {:?}", start.elapsed());
    assert!(totals.calls > 0 && totals.restores > 0);
}
