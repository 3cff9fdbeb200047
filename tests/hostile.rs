//! A hostile guest, on real KVM: `guests/rawguest` runs a script of raw ABI
//! actions (any hypercall with any arguments, any ABI-page contents, port
//! reads, string I/O, privileged instructions). Each test checks that the
//! host refuses to act outside the guest's own rights, that every failure is
//! a typed error, and that the *next* request never sees the previous one.

mod common;

use std::mem::offset_of;

use snapvm::abi::{self, AbiPage, Hypercall};
use snapvm::vm::{HypercallFault, ScratchDisk};
use snapvm::{GuestProgram, Snapshot, VmConfig, VmError, VmInstance, VmState};

const MEMORY: u64 = 64 << 20;
/// The scratch disk (the script) sits right above guest memory.
const DISK: u64 = MEMORY;
const DISK_SIZE: usize = 64 << 10;
/// Where the script's data lives inside the disk.
const DATA: u64 = 0x1000;
const NAMES: u64 = DATA + 0x100;
const INPUT: u64 = 0x4000;
const INNOCENT_OUT: u64 = DATA + 0x400;
const HOSTILE_OUT: u64 = DATA + 0x500;

fn off(field: usize) -> u64 {
    field as u64
}

/// Builds a rawguest disk: script words plus data.
struct Script {
    words: Vec<u64>,
    disk: Vec<u8>,
}

impl Script {
    fn new() -> Self {
        let mut s = Self {
            words: Vec::new(),
            disk: vec![0; DISK_SIZE],
        };
        s.data(NAMES, &name_entries());
        s.data(NAMES + 0x100, b"hostile");
        s.data(NAMES + 0x110, b"innocent");
        s.data(INNOCENT_OUT, b"innocent");
        s.data(HOSTILE_OUT, b"HOSTILE!");
        s
    }

    fn data(&mut self, offset: u64, bytes: &[u8]) {
        self.disk[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    }

    fn abi(&mut self, field: usize, value: u64) -> &mut Self {
        self.words.extend([1, off(field), value]);
        self
    }

    fn abi_disk(&mut self, field: usize, add: u64) -> &mut Self {
        self.words.extend([10, off(field), add]);
        self
    }

    fn arg(&mut self, i: usize, value: u64) -> &mut Self {
        self.abi(offset_of!(AbiPage, args) + 8 * i, value)
    }

    fn hypercall(&mut self, nr: u32) -> &mut Self {
        self.words.extend([3, u64::from(nr)]);
        self
    }

    fn op(&mut self, words: &[u64]) -> &mut Self {
        self.words.extend_from_slice(words);
        self
    }

    /// A well-formed `Ready`: two functions (`hostile` = 0, `innocent` = 1)
    /// and an input buffer in the disk, unless `input` says otherwise.
    fn ready_with_input(&mut self, input: Option<(u64, u64)>) -> &mut Self {
        self.abi(
            offset_of!(AbiPage, version),
            u64::from(abi::ABI_VERSION) | u64::from(abi::ABI_VERSION) << 32,
        )
        .abi_disk(offset_of!(AbiPage, func_table), NAMES)
        .abi(offset_of!(AbiPage, func_count), 2);
        match input {
            Some((buf, cap)) => self
                .abi(offset_of!(AbiPage, input_buf), buf)
                .abi(offset_of!(AbiPage, input_cap), cap),
            None => self
                .abi_disk(offset_of!(AbiPage, input_buf), INPUT)
                .abi(offset_of!(AbiPage, input_cap), 0x1000),
        };
        self.hypercall(Hypercall::Ready as u32)
    }

    fn ready(&mut self) -> &mut Self {
        self.ready_with_input(None)
    }

    /// Sets the output to the data at `at` (8 bytes), status OK, and `Done`.
    fn done_with(&mut self, at: u64) -> &mut Self {
        self.abi_disk(offset_of!(AbiPage, output_ptr), at)
            .abi(offset_of!(AbiPage, output_len), 8)
            .abi(offset_of!(AbiPage, status), abi::STATUS_OK)
            .hypercall(Hypercall::Done as u32)
    }

    /// After `Ready`: a dispatch on the function index; `hostile` runs
    /// `attack` then answers `HOSTILE!`, `innocent` answers `innocent`.
    fn serve(&mut self, attack: impl FnOnce(&mut Self)) -> &mut Self {
        let dispatch = self.words.len() as u64;
        self.op(&[11, 2, 0, 0]);
        let hostile = self.words.len() as u64;
        attack(self);
        self.done_with(HOSTILE_OUT).op(&[9, dispatch]);
        let innocent = self.words.len() as u64;
        self.done_with(INNOCENT_OUT).op(&[9, dispatch]);
        self.words[dispatch as usize + 2] = hostile;
        self.words[dispatch as usize + 3] = innocent;
        self
    }

    fn config(&self) -> VmConfig {
        let mut disk = self.disk.clone();
        assert!(self.words.len() * 8 <= DATA as usize, "script too long");
        for (i, w) in self.words.iter().enumerate() {
            disk[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        VmConfig::new(GuestProgram::from_file(common::guest_path("rawguest")).expect("rawguest"))
            .memory_size(MEMORY)
            .scratch_disk(ScratchDisk::from_bytes(disk))
            .timeout(Some(std::time::Duration::from_secs(2)))
            .dirty_tracking(true)
            .host_function("evil", |_| Ok(vec![0xFF; 64]))
    }
}

fn name_entries() -> Vec<u8> {
    name_entries_in_order(false)
}

/// The function table: `hostile`, `innocent` (or the other way round).
fn name_entries_in_order(swapped: bool) -> Vec<u8> {
    let (first, second) = if swapped {
        ((0x110, 8), (0x100, 7))
    } else {
        ((0x100, 7), (0x110, 8))
    };
    [
        DISK + NAMES + first.0,
        first.1,
        DISK + NAMES + second.0,
        second.1,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect()
}

type Attack = Box<dyn Fn(&mut Script)>;

/// A VM serving `attack` as `hostile`, and its ready snapshot.
fn serving(attack: impl FnOnce(&mut Script)) -> (VmInstance, Snapshot) {
    let mut script = Script::new();
    script.ready().serve(attack);
    let mut vm = VmInstance::new(&script.config()).expect("rawguest boots");
    let ready = vm.snapshot().expect("snapshot");
    assert_eq!(
        vm.invoke("innocent", b"").expect("innocent call"),
        b"innocent"
    );
    vm.restore_in_place(&ready).expect("reset");
    (vm, ready)
}

fn is_bad_hypercall(e: &VmError) -> bool {
    matches!(e, VmError::BadHypercall { .. })
}

/// System-area addresses a confused host could be aimed at.
const SYSTEM_TARGETS: [u64; 5] = [
    0xA000,                // PML4
    0x3000,                // IDT
    0x2000,                // GDT
    abi::ABI_PAGE_ADDR,    // the ABI page itself
    abi::STACK_GUARD_ADDR, // the unmapped stack guard
];

#[test]
fn ready_with_input_buffer_outside_user_memory_is_refused() {
    require_kvm!();
    for target in SYSTEM_TARGETS {
        let mut script = Script::new();
        script.ready_with_input(Some((target, 0x1000)));
        let err = VmInstance::new(&script.config()).expect_err("a system-area input buffer");
        assert!(is_bad_hypercall(&err), "{target:#x}: {err}");
    }
}

#[test]
fn grow_answered_with_system_area_is_refused() {
    require_kvm!();
    for target in SYSTEM_TARGETS {
        // Every request after Ready is answered as a grow: with a buffer in
        // memory the guest cannot write itself.
        let mut script = Script::new();
        script.ready();
        let answer = script.words.len() as u64;
        script
            .abi(offset_of!(AbiPage, input_buf), target)
            .abi(offset_of!(AbiPage, input_cap), 1 << 20)
            .abi(offset_of!(AbiPage, status), abi::STATUS_OK)
            .hypercall(Hypercall::Done as u32)
            .op(&[9, answer]);
        let mut vm = VmInstance::new(&script.config()).expect("boots");
        let err = vm
            .invoke("innocent", &[0x41; 0x2000])
            .expect_err("growing into the system area");
        assert!(is_bad_hypercall(&err), "{target:#x}: {err}");
        assert_eq!(vm.state(), VmState::Poisoned);
    }
}

#[test]
fn host_call_output_outside_user_memory_is_refused() {
    require_kvm!();
    for target in SYSTEM_TARGETS {
        let (mut vm, _) = serving(|s| {
            s.data(NAMES + 0x180, b"evil");
            s.arg(0, DISK + NAMES + 0x180)
                .arg(1, 4)
                .arg(2, DISK + INPUT)
                .arg(3, 0)
                .arg(4, target)
                .arg(5, 0x1000)
                .hypercall(Hypercall::HostCall as u32);
        });
        let err = vm
            .invoke("hostile", b"")
            .expect_err("host writes for the guest");
        assert!(is_bad_hypercall(&err), "{target:#x}: {err}");
        assert_eq!(vm.state(), VmState::Poisoned);
    }
}

#[test]
fn host_result_outside_user_memory_is_refused() {
    require_kvm!();
    for target in SYSTEM_TARGETS {
        let (mut vm, _) = serving(|s| {
            s.data(NAMES + 0x180, b"evil");
            s.arg(0, DISK + NAMES + 0x180)
                .arg(1, 4)
                .arg(2, DISK + INPUT)
                .arg(3, 0)
                .arg(4, DISK + INPUT)
                .arg(5, 0) // too small: the result waits for HostResult
                .hypercall(Hypercall::HostCall as u32)
                .arg(0, target)
                .arg(1, 0x1000)
                .hypercall(Hypercall::HostResult as u32);
        });
        let err = vm
            .invoke("hostile", b"")
            .expect_err("host result into the system area");
        assert!(is_bad_hypercall(&err), "{target:#x}: {err}");
    }
}

#[test]
fn host_reads_only_user_memory() {
    require_kvm!();
    for target in SYSTEM_TARGETS {
        // A log message, a panic message and the output, each read from
        // memory the guest cannot read itself.
        let attacks: [Attack; 3] = [
            Box::new(move |s| {
                s.arg(0, 3)
                    .arg(1, target)
                    .arg(2, 64)
                    .hypercall(Hypercall::Log as u32);
            }),
            Box::new(move |s| {
                s.arg(0, target)
                    .arg(1, 64)
                    .arg(3, 0)
                    .hypercall(Hypercall::Panic as u32);
            }),
            Box::new(move |s| {
                s.abi(offset_of!(AbiPage, output_ptr), target)
                    .abi(offset_of!(AbiPage, output_len), 64)
                    .abi(offset_of!(AbiPage, status), abi::STATUS_OK)
                    .hypercall(Hypercall::Done as u32);
            }),
        ];
        for (i, attack) in attacks.iter().enumerate() {
            let (mut vm, _) = serving(|s| attack(s));
            let err = vm
                .invoke("hostile", b"")
                .expect_err("reading the system area");
            assert!(is_bad_hypercall(&err), "attack {i} at {target:#x}: {err}");
        }
    }
}

/// After `attack` made the hostile call fail (or return), a reset and an
/// innocent call: the innocent call must see nothing of the attack.
fn assert_reset_isolates(name: &str, attack: impl FnOnce(&mut Script), must_fail: bool) {
    let (mut vm, ready) = serving(attack);
    let result = vm.invoke("hostile", b"");
    if must_fail {
        assert!(
            result.is_err(),
            "{name}: the hostile call succeeded: {result:?}"
        );
    }
    vm.restore_in_place(&ready)
        .unwrap_or_else(|e| panic!("{name}: reset failed: {e}"));
    for _ in 0..3 {
        let out = vm
            .invoke("innocent", b"")
            .unwrap_or_else(|e| panic!("{name}: innocent call after reset: {e}"));
        assert_eq!(
            out, b"innocent",
            "{name}: the next request saw the previous one"
        );
        vm.restore_in_place(&ready).expect("reset");
    }
}

#[test]
fn pending_io_never_survives_a_reset() {
    require_kvm!();
    assert_reset_isolates(
        "in",
        |s| {
            s.op(&[4]);
        },
        true,
    );
    assert_reset_isolates(
        "rep insb",
        |s| {
            s.op(&[5, 64]);
        },
        true,
    );
    assert_reset_isolates(
        "rep insb, huge count",
        |s| {
            s.op(&[5, u64::MAX]);
        },
        true,
    );
    assert_reset_isolates(
        "outsd Done",
        |s| {
            s.op(&[6, Hypercall::Done as u64]);
        },
        false,
    );
    assert_reset_isolates(
        "rep outsd Done",
        |s| {
            s.op(&[7, 2, Hypercall::Done as u64]);
        },
        false,
    );
    assert_reset_isolates(
        "rep outsd Log",
        |s| {
            s.op(&[7, 8, Hypercall::Log as u64]);
        },
        false,
    );
}

#[test]
fn privileged_instructions_fault_and_reset_restores() {
    require_kvm!();
    for kind in 0..8u64 {
        let (mut vm, ready) = serving(|s| {
            s.op(&[8, kind]);
        });
        let err = vm.invoke("hostile", b"").expect_err("privileged at CPL3");
        assert!(matches!(err, VmError::GuestFault(_)), "kind {kind}: {err}");
        vm.restore_in_place(&ready).expect("reset");
        assert_eq!(vm.invoke("innocent", b"").expect("innocent"), b"innocent");
    }
}

#[test]
fn unknown_hypercalls_and_wild_arguments_are_typed_errors() {
    require_kvm!();
    // Every hypercall with arguments at the extremes.
    let extremes = [
        0,
        1,
        0xFFF,
        abi::SYSTEM_AREA_END,
        DISK,
        u64::MAX / 2,
        u64::MAX,
    ];
    for nr in 0..12u32 {
        for &a in &extremes {
            let (mut vm, ready) = serving(|s| {
                for i in 0..8 {
                    s.arg(i, a.wrapping_add(i as u64));
                }
                s.hypercall(nr);
            });
            let _ = vm.invoke("hostile", b"");
            vm.restore_in_place(&ready).expect("reset");
            assert_eq!(vm.invoke("innocent", b"").expect("innocent"), b"innocent");
        }
    }
}

/// Two snapshots of one program whose function tables differ (same size,
/// other order): a VM rewound in place from one to the other must call
/// functions by the table of the snapshot it now holds.
#[test]
fn restore_in_place_installs_the_snapshots_own_function_table() {
    require_kvm!();
    let build = |swapped: bool| {
        let mut script = Script::new();
        script.data(NAMES, &name_entries_in_order(swapped));
        script.ready().serve(|_| {});
        let config = script.config();
        let mut vm = VmInstance::new(&config).expect("boots");
        let ready = vm.snapshot().expect("snapshot");
        (config, vm, ready)
    };
    let (_, mut vm, a) = build(false);
    let (config_b, _, b) = build(true);
    let expected = VmInstance::restore(&config_b, &b)
        .expect("fresh restore")
        .invoke("innocent", b"")
        .expect("call");
    assert_eq!(expected, b"HOSTILE!", "in b, index 0 is named innocent");
    vm.restore_in_place(&b).expect("rewind to b");
    assert_eq!(vm.invoke("innocent", b"").expect("call"), expected);
    vm.restore_in_place(&a).expect("rewind to a");
    assert_eq!(vm.invoke("innocent", b"").expect("call"), b"innocent");
    // Again to a (the table installed last), then to b.
    vm.restore_in_place(&a).expect("rewind to a again");
    assert_eq!(vm.invoke("innocent", b"").expect("call"), b"innocent");
    vm.restore_in_place(&b).expect("rewind to b again");
    assert_eq!(vm.invoke("innocent", b"").expect("call"), expected);
}

#[test]
fn guest_messages_are_truncated_to_the_limit() {
    require_kvm!();
    let mut script = Script::new();
    script.data(0x8000, &[b'x'; 0x4000]);
    script.ready().serve(|s| {
        s.arg(0, DISK + 0x8000)
            .arg(1, 0x4000)
            .arg(3, 0)
            .hypercall(Hypercall::Panic as u32);
    });
    let mut vm = VmInstance::new(&script.config().max_message(100)).expect("boots");
    match vm.invoke("hostile", b"") {
        Err(VmError::GuestPanic { message, .. }) => assert_eq!(message, "x".repeat(100)),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_grow_answered_with_a_smaller_buffer_says_so() {
    require_kvm!();
    let mut script = Script::new();
    script.ready();
    let answer = script.words.len() as u64;
    script
        .abi_disk(offset_of!(AbiPage, input_buf), INPUT)
        .abi(offset_of!(AbiPage, input_cap), 0x1800)
        .abi(offset_of!(AbiPage, status), abi::STATUS_OK)
        .hypercall(Hypercall::Done as u32)
        .op(&[9, answer]);
    let mut vm = VmInstance::new(&script.config()).expect("boots");
    let err = vm.invoke("innocent", &[1; 0x2000]).expect_err("too small");
    assert!(
        matches!(
            err,
            VmError::BadHypercall {
                reason: HypercallFault::InputBufferTooSmall {
                    wanted: 0x2000,
                    offered: 0x1800
                },
                ..
            }
        ),
        "{err}"
    );
}

/// A guest error (`STATUS_GUEST_ERROR`) is read with the same rules as any
/// output: a message in the system area is refused, a huge one truncated.
#[test]
fn guest_error_messages_obey_the_buffer_rule_and_the_limit() {
    require_kvm!();
    for target in SYSTEM_TARGETS {
        let (mut vm, _) = serving(|s| {
            s.abi(offset_of!(AbiPage, output_ptr), target)
                .abi(offset_of!(AbiPage, output_len), 64)
                .abi(offset_of!(AbiPage, status), abi::STATUS_GUEST_ERROR)
                .arg(0, 7)
                .hypercall(Hypercall::Done as u32);
        });
        let err = vm
            .invoke("hostile", b"")
            .expect_err("message in the system area");
        assert!(is_bad_hypercall(&err), "{target:#x}: {err}");
    }
    let mut script = Script::new();
    script.data(0x8000, &[b'y'; 0x4000]);
    script.ready().serve(|s| {
        s.abi_disk(offset_of!(AbiPage, output_ptr), 0x8000)
            .abi(offset_of!(AbiPage, output_len), 0x4000)
            .abi(offset_of!(AbiPage, status), abi::STATUS_GUEST_ERROR)
            .arg(0, u64::MAX - 1)
            .hypercall(Hypercall::Done as u32);
    });
    let mut vm = VmInstance::new(&script.config().max_message(32)).expect("boots");
    match vm.invoke("hostile", b"") {
        Err(VmError::GuestError { code, message }) => {
            assert_eq!(code, u32::MAX - 1);
            assert_eq!(message, "y".repeat(32));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Ready);
}

/// Raw transaction hypercalls out of order or with hostile arguments end
/// the call with a typed error, under a transaction runner or not, and the
/// VM resets cleanly.
#[test]
fn hostile_transaction_hypercalls_are_typed_errors() {
    require_kvm!();
    use snapvm::policy::{RetryPolicy, Transaction, TxError};
    use snapvm::vm::TxFault;
    let begin = Hypercall::TxBegin as u32;
    let end = Hypercall::TxEnd as u32;
    type Expected = fn(&VmError) -> bool;
    let attacks: Vec<(&str, Attack, Expected)> = vec![
        (
            "begin twice",
            Box::new(move |s: &mut Script| {
                s.hypercall(begin).hypercall(begin);
            }),
            |e| matches!(e, VmError::Transaction(TxFault::Nested)),
        ),
        (
            "end without begin",
            Box::new(move |s: &mut Script| {
                s.arg(0, abi::TX_COMMIT).hypercall(end);
            }),
            |e| matches!(e, VmError::Transaction(TxFault::EndWithoutBegin)),
        ),
        (
            "unknown outcome",
            Box::new(move |s: &mut Script| {
                s.hypercall(begin).arg(0, 7).hypercall(end);
            }),
            |e| matches!(e, VmError::Transaction(TxFault::BadOutcome(7))),
        ),
        (
            "abort reason in the system area",
            Box::new(move |s: &mut Script| {
                s.hypercall(begin)
                    .arg(0, abi::TX_ABORT)
                    .arg(1, 0x3000)
                    .arg(2, 0x100)
                    .hypercall(end);
            }),
            is_bad_hypercall,
        ),
        (
            "abort reason past the end of memory",
            Box::new(move |s: &mut Script| {
                s.hypercall(begin)
                    .arg(0, abi::TX_ABORT)
                    .arg(1, u64::MAX - 8)
                    .arg(2, 0x100)
                    .hypercall(end);
            }),
            is_bad_hypercall,
        ),
        (
            "return inside the transaction",
            Box::new(move |s: &mut Script| {
                s.hypercall(begin);
            }),
            |e| matches!(e, VmError::Transaction(TxFault::NotEnded)),
        ),
    ];
    for (what, attack, expected) in attacks {
        let (mut vm, ready) = serving(|s| attack(s));
        let err = vm.invoke("hostile", b"").expect_err(what);
        assert!(expected(&err), "{what}: {err}");
        vm.restore_in_place(&ready).expect("reset");
        let tx = Transaction::new().retry(RetryPolicy::default().max_attempts(3).no_backoff());
        let err = tx.invoke(&mut vm, &ready, "hostile", b"").expect_err(what);
        assert!(matches!(err, TxError::Fatal { .. }), "{what}: {err}");
        assert!(err.vm_error().is_some_and(expected), "{what}: {err}");
        vm.restore_in_place(&ready).expect("reset");
        assert_eq!(vm.invoke("innocent", b"").expect(what), b"innocent");
    }
}

/// `NetExchange` with buffers a guest may not name: the host would read the
/// system area to put it on the wire, or write received frames into it. The
/// ranges are checked before the device is even looked at, so a VM with no
/// device shows the same refusal; after a reset the VM serves again.
#[test]
fn net_exchange_buffers_outside_user_memory_are_refused() {
    require_kvm!();
    let exchange = Hypercall::NetExchange as u32;
    let user = DISK + INPUT;
    let mut cases: Vec<(u64, u64, u64, u64)> = Vec::new();
    for target in SYSTEM_TARGETS {
        cases.push((target, 0x100, user, 0x100)); // send the system area
        cases.push((user, 0, target, 0x1000)); // receive into it
    }
    cases.push((user, u64::MAX, user, 0x100)); // a length that wraps
    cases.push((user, 0, u64::MAX - 0x10, 0x100)); // an address that wraps
    cases.push((user, abi::NET_MAX_BATCH + 1, user, 0x100)); // over the batch limit
    for (tx, tx_len, rx, rx_cap) in cases {
        let what = format!("tx {tx:#x}+{tx_len:#x}, rx {rx:#x}+{rx_cap:#x}");
        let (mut vm, ready) = serving(|s| {
            s.arg(0, tx)
                .arg(1, tx_len)
                .arg(2, rx)
                .arg(3, rx_cap)
                .arg(4, 0)
                .hypercall(exchange);
        });
        let err = vm.invoke("hostile", b"").expect_err(&what);
        assert!(is_bad_hypercall(&err), "{what}: {err}");
        assert_eq!(vm.state(), VmState::Poisoned, "{what}");
        vm.restore_in_place(&ready).expect("reset");
        assert_eq!(
            vm.invoke("innocent", b"").expect("innocent call"),
            b"innocent",
            "{what}"
        );
    }
}
