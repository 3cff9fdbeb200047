//! Malformed guest programs are rejected with `InvalidGuest` before any VM
//! exists. These tests need no KVM.

mod common;

use snapvm::vm::InvalidGuest;
use snapvm::{GuestProgram, VmConfig, VmError};

fn elf() -> Vec<u8> {
    std::fs::read(common::guest_path("quickstart")).expect("guest built")
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Offsets of every program header, and of the first PT_LOAD one.
fn phdrs(b: &[u8]) -> (Vec<usize>, usize) {
    let phoff = u64_at(b, 32) as usize;
    let count = usize::from(u16_at(b, 56));
    let all: Vec<usize> = (0..count).map(|i| phoff + i * 56).collect();
    let load = *all
        .iter()
        .find(|&&p| b[p..p + 4] == 1u32.to_le_bytes())
        .unwrap();
    (all, load)
}

fn reject(bytes: Vec<u8>) -> InvalidGuest {
    GuestProgram::from_bytes(bytes).expect_err("must be rejected")
}

#[test]
fn the_unmodified_program_is_accepted() {
    let program = GuestProgram::from_bytes(elf()).unwrap();
    assert!(program.entry() >= snapvm::abi::USER_BASE);
}

#[test]
fn truncated_files_are_rejected() {
    let full = elf();
    let (_, load) = phdrs(&full);
    for len in [0, 1, 16, 63, 64, load + 20, full.len() / 2, full.len() - 1] {
        let err = reject(full[..len].to_vec());
        assert!(
            matches!(
                err,
                InvalidGuest::Parse(_) | InvalidGuest::SegmentOutsideFile { .. }
            ),
            "length {len}: {err:?}"
        );
    }
}

#[test]
fn wrong_machine_is_rejected() {
    let mut b = elf();
    b[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    assert!(matches!(
        reject(b),
        InvalidGuest::WrongMachine { machine: 183 }
    ));
}

#[test]
fn position_independent_executables_are_rejected() {
    let mut b = elf();
    b[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
    assert!(matches!(
        reject(b),
        InvalidGuest::NotStaticExecutable { elf_type: 3 }
    ));
}

#[test]
fn dynamically_linked_programs_are_rejected() {
    for (p_type, name) in [(3u32, "PT_INTERP"), (2, "PT_DYNAMIC")] {
        let mut b = elf();
        let (all, load) = phdrs(&b);
        let other = *all.iter().find(|&&p| p != load).unwrap();
        b[other..other + 4].copy_from_slice(&p_type.to_le_bytes());
        assert!(matches!(reject(b), InvalidGuest::Dynamic { segment } if segment == name));
    }
}

#[test]
fn segments_outside_the_program_area_are_rejected() {
    for vaddr in [0, 0x1000, 0x2000, 0x10_0000, 0xFFFF_FFFF_FFFF_0000] {
        let mut b = elf();
        let (_, load) = phdrs(&b);
        put_u64(&mut b, load + 16, vaddr);
        assert!(
            matches!(
                reject(b),
                InvalidGuest::SegmentOutOfRange { .. } | InvalidGuest::BadEntry { .. }
            ),
            "vaddr {vaddr:#x}"
        );
    }
}

#[test]
fn absurd_sizes_are_rejected() {
    let mut b = elf();
    let (_, load) = phdrs(&b);
    put_u64(&mut b, load + 40, u64::MAX); // p_memsz overflows
    assert!(matches!(reject(b), InvalidGuest::SegmentOutOfRange { .. }));

    let mut b = elf();
    let memsz = u64_at(&b, load + 40);
    put_u64(&mut b, load + 32, memsz + 1); // p_filesz > p_memsz
    assert!(matches!(reject(b), InvalidGuest::SegmentSizes { .. }));

    let mut b = elf();
    put_u64(&mut b, load + 8, u64::MAX - 4); // p_offset + p_filesz overflows
    assert!(matches!(reject(b), InvalidGuest::SegmentOutsideFile { .. }));
}

#[test]
fn an_entry_point_outside_executable_segments_is_rejected() {
    let mut b = elf();
    put_u64(&mut b, 24, 0x1000);
    assert!(matches!(
        reject(b),
        InvalidGuest::BadEntry { entry: 0x1000 }
    ));
}

#[test]
fn a_program_larger_than_guest_memory_is_rejected_by_validation() {
    let mut b = elf();
    let (_, load) = phdrs(&b);
    let memsz = u64_at(&b, load + 40);
    put_u64(&mut b, load + 40, memsz + (8 << 20)); // a large .bss
    let config = VmConfig::new(GuestProgram::from_bytes(b).unwrap()).memory_size(8 << 20);
    assert!(matches!(
        config.validate(),
        Err(VmError::InvalidGuest(InvalidGuest::TooLarge { .. }))
    ));
}

#[test]
fn random_corruptions_never_panic() {
    let original = elf();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let header_area = 64 + 56 * usize::from(u16_at(&original, 56));
    for _ in 0..2000 {
        let mut b = original.clone();
        for _ in 0..1 + next() % 8 {
            // Mostly corrupt the headers, where parsing decisions are made.
            let at = (next() as usize) % header_area.min(b.len());
            b[at] = next() as u8;
        }
        if next() % 4 == 0 {
            b.truncate((next() as usize) % b.len());
        }
        let _ = GuestProgram::from_bytes(b);
    }
}

#[test]
fn a_missing_file_is_a_read_error() {
    assert!(matches!(
        GuestProgram::from_file("/nonexistent/guest"),
        Err(InvalidGuest::Read { .. })
    ));
}
