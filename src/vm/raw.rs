//! Bare KVM baselines for the benchmark report: the same VM shape snapvm
//! uses (long mode, CPL3, the same page tables and TSS) running a few bytes
//! of machine code instead of a guest program. Not a stable API.
#![doc(hidden)]

use super::error::VmError;
use super::machine::{self, Machine};
use crate::abi::{STACK_TOP, USER_BASE};

/// A VM running raw machine code placed at [`USER_BASE`].
pub struct RawGuest {
    machine: Machine,
}

impl RawGuest {
    /// Builds a VM of `memory_size` bytes running `code` at CPL3.
    pub fn new(code: &[u8], memory_size: u64) -> Result<Self, VmError> {
        let machine = Machine::new(memory_size, USER_BASE, STACK_TOP - 8)?;
        machine
            .ram()
            .write(USER_BASE, code)
            .map_err(|e| VmError::InvalidConfig {
                field: "code",
                reason: format!("does not fit at {:#x}", e.addr),
            })?;
        Ok(Self { machine })
    }

    /// Runs the vCPU until its next exit and returns the port of an I/O
    /// write, or an error for any other exit.
    pub fn run_once(&mut self) -> Result<u16, VmError> {
        loop {
            if let Some((port, _, _)) = super::io_exit(self.machine.vcpu().run())? {
                return Ok(port);
            }
        }
    }

    /// Removes the IDT, so that any exception becomes a triple fault.
    pub fn remove_idt(&mut self) -> Result<(), VmError> {
        let vcpu = self.machine.vcpu();
        let mut sregs = vcpu.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
        sregs.idt.limit = 0;
        vcpu.set_sregs(&sregs)
            .map_err(VmError::kvm("KVM_SET_SREGS"))
    }
}

/// `out 0xF0, eax; jmp back`: one hypercall-port exit per run.
pub const EXIT_LOOP: &[u8] = &[0xE7, 0xF0, 0xEB, 0xFC];

/// Touches each of the 255 pages of the 4 KiB-mapped user stack area once
/// (from `STACK_BOTTOM`), then loops on `out 0xF0, eax`.
pub const TOUCH_STACK_PAGES: &[u8] = &[
    0x48, 0xC7, 0xC7, 0x00, 0x10, 0x10, 0x00, // mov rdi, 0x101000
    0xB9, 0xFF, 0x00, 0x00, 0x00, // mov ecx, 255
    0xC6, 0x07, 0x01, // l: mov byte [rdi], 1
    0x48, 0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
    0xFF, 0xC9, // dec ecx
    0x75, 0xF2, // jnz l
    0xE7, 0xF0, // o: out 0xF0, eax
    0xEB, 0xFC, // jmp o
];

/// Pages [`TOUCH_STACK_PAGES`] touches.
pub const TOUCHED_PAGES: u64 = 255;

/// Creates an empty VM and one vCPU, then drops both.
pub fn create_empty_vm() -> Result<(), VmError> {
    machine::create_empty()
}
