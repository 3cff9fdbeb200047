//! vCPU state: everything about the CPU a guest can observe, captured with
//! KVM's getters and applied with its setters, plus the CPU compatibility
//! check.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{SyncReg, VcpuFd};

use super::SnapshotError;
use crate::vm::VmError;

/// MSRs a guest can observe or that shape its execution: SYSENTER, PAT,
/// SYSCALL targets, kernel GS base, TSC_AUX and the TSC itself (restored so
/// the guest sees no jump).
pub(crate) const SAVED_MSRS: [u32; 11] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0102, // KERNEL_GS_BASE
    0xC000_0103, // TSC_AUX
];

/// Loads registers still pending in `kvm_run` (see
/// [`CpuState::apply_registers`]) with ioctls, so the getters see them.
fn flush_sync_regs(vcpu: &mut VcpuFd) -> Result<(), SnapshotError> {
    let dirty = vcpu.get_kvm_run().kvm_dirty_regs;
    let shared = vcpu.sync_regs();
    if dirty & u64::from(kvm_bindings::KVM_SYNC_X86_SREGS) != 0 {
        vcpu.set_sregs(&shared.sregs)
            .map_err(kvm("KVM_SET_SREGS"))?;
    }
    if dirty & u64::from(kvm_bindings::KVM_SYNC_X86_REGS) != 0 {
        vcpu.set_regs(&shared.regs).map_err(kvm("KVM_SET_REGS"))?;
    }
    clear_sync_regs(vcpu);
    Ok(())
}

fn clear_sync_regs(vcpu: &mut VcpuFd) {
    vcpu.clear_sync_dirty_reg(SyncReg::Register);
    vcpu.clear_sync_dirty_reg(SyncReg::SystemRegister);
}

/// Which registers a restore writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Registers {
    /// Everything (a new VM, or one stopped anywhere).
    All,
    /// What CPL3 code can change: general and segment registers and the
    /// x87/SSE/AVX state. It cannot change control registers, XCR0, MSRs or
    /// debug registers.
    UserMode,
    /// General and segment registers: for a guest that resets its own
    /// vector state around the hypercall the VM is rewound to
    /// (`GUEST_FLAG_RESETS_VECTOR_STATE`).
    NoVector,
}

/// The state of one vCPU.
pub(crate) struct CpuState {
    pub(crate) regs: kvm_regs,
    pub(crate) sregs: kvm_sregs,
    pub(crate) xsave: kvm_xsave,
    pub(crate) xcrs: kvm_xcrs,
    pub(crate) debugregs: kvm_debugregs,
    pub(crate) events: kvm_vcpu_events,
    pub(crate) msrs: Vec<kvm_msr_entry>,
    pub(crate) cpuid: Vec<kvm_cpuid_entry2>,
}

fn kvm(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Vm(VmError::Kvm { step, source })
}

impl CpuState {
    /// Reads the state of a stopped vCPU.
    pub(crate) fn capture(vcpu: &mut VcpuFd) -> Result<Self, SnapshotError> {
        flush_sync_regs(vcpu)?;
        let mut msrs = Msrs::from_entries(&SAVED_MSRS.map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        }))
        .map_err(|_| SnapshotError::Malformed {
            section: "cpu",
            reason: "MSR list too long",
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(Self {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            msrs: msrs.as_slice()[..read].to_vec(),
            cpuid: cpuid.as_slice().to_vec(),
        })
    }

    /// Applies the state to a vCPU (CPUID first: it decides which other
    /// state KVM accepts).
    /// `KVM_SET_CPUID2` is skipped when `current` (the CPUID the vCPU
    /// already has) equals the snapshot's: it is the most expensive call.
    pub(crate) fn apply(
        &self,
        vcpu: &mut VcpuFd,
        current: Option<&[kvm_cpuid_entry2]>,
    ) -> Result<(), SnapshotError> {
        // Registers handed over in `kvm_run` but not loaded yet would
        // override what is set here on the next run.
        clear_sync_regs(vcpu);
        if current != Some(self.cpuid.as_slice()) {
            let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::Malformed {
                section: "cpu",
                reason: "too many CPUID entries",
            })?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        }
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy structure, which is
        // exactly what KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| SnapshotError::Malformed {
            section: "cpu",
            reason: "too many MSRs",
        })?;
        vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Restores the given set of registers (see [`Registers`]).
    ///
    /// With `sync_regs`, the general and system registers are handed to KVM
    /// in the shared `kvm_run` area and loaded on the next `KVM_RUN`,
    /// instead of with two ioctls of their own.
    pub(crate) fn apply_registers(
        &self,
        vcpu: &mut VcpuFd,
        current_cpuid: Option<&[kvm_cpuid_entry2]>,
        which: Registers,
        sync_regs: bool,
    ) -> Result<(), SnapshotError> {
        match which {
            Registers::All => return self.apply(vcpu, current_cpuid),
            Registers::UserMode => {
                // SAFETY: as in `apply`.
                unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
            }
            Registers::NoVector => {}
        }
        if sync_regs {
            let shared = vcpu.sync_regs_mut();
            shared.regs = self.regs;
            shared.sregs = self.sregs;
            vcpu.set_sync_dirty_reg(SyncReg::Register);
            vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
            Ok(())
        } else {
            vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
            vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))
        }
    }

    /// Checks that `host` (the CPUID KVM supports here) has every feature
    /// bit the snapshot's CPUID advertises to the guest.
    pub(crate) fn check_compatible(&self, host: &CpuId) -> Result<(), SnapshotError> {
        // Feature leaves: (leaf, sub-leaf, registers to compare).
        const FEATURE_LEAVES: [(u32, u32, [bool; 4]); 5] = [
            (0x1, 0, [false, false, true, true]),
            (0x7, 0, [false, true, true, true]),
            (0x7, 1, [true, false, false, false]),
            (0xD, 0, [true, false, false, true]),
            (0x8000_0001, 0, [false, false, true, true]),
        ];
        const NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
        let host = host.as_slice();
        for (leaf, index, regs) in FEATURE_LEAVES {
            let find = |entries: &[kvm_cpuid_entry2]| {
                entries
                    .iter()
                    .find(|e| e.function == leaf && (e.index == index || index == 0))
                    .copied()
            };
            let Some(guest) = find(&self.cpuid) else {
                continue;
            };
            let host = find(host).unwrap_or_default();

            let pairs = [
                (guest.eax, host.eax),
                (guest.ebx, host.ebx),
                (guest.ecx, host.ecx),
                (guest.edx, host.edx),
            ];
            for (i, (g, h)) in pairs.into_iter().enumerate() {
                // Leaf 1 ECX bit 27 (OSXSAVE) and EBX/APIC fields are per-vCPU, not features.
                let mask = if leaf == 1 && i == 2 {
                    !(1u32 << 27)
                } else {
                    u32::MAX
                };
                let missing = g & !h & mask;
                if regs[i] && missing != 0 {
                    return Err(SnapshotError::CpuMismatch {
                        leaf,
                        index,
                        register: NAMES[i],
                        missing,
                    });
                }
            }
        }
        Ok(())
    }
}
