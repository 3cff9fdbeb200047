//! vCPU state: everything about the CPU a guest can observe, captured with
//! KVM's getters and applied with its setters, plus the CPU compatibility
//! check.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{SyncReg, VcpuFd};
use std::sync::OnceLock;

use super::VmError;
use crate::sys::kvm::set_xsave;
use crate::vm::machine::{normalize_cpuid, Machine};

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
fn flush_sync_regs(vcpu: &mut VcpuFd) -> Result<(), VmError> {
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

/// Writes the general and system registers: with `sync_regs` through the
/// shared `kvm_run` page (KVM loads them at the next `KVM_RUN`, see
/// [`flush_sync_regs`]), otherwise with ioctls.
fn set_registers(
    vcpu: &mut VcpuFd,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    sync_regs: bool,
) -> Result<(), VmError> {
    if sync_regs {
        let shared = vcpu.sync_regs_mut();
        shared.regs = *regs;
        shared.sregs = Machine::host_sregs(sregs);
        vcpu.set_sync_dirty_reg(SyncReg::Register);
        vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
        Ok(())
    } else {
        vcpu.set_sregs(&Machine::host_sregs(sregs))
            .map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(regs).map_err(kvm("KVM_SET_REGS"))
    }
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
    /// The CPUID the guest sees, with the per-CPU fields normalised (see
    /// [`normalize_cpuid`]): construct with [`CpuState::normalized`].
    pub(crate) cpuid: Vec<kvm_cpuid_entry2>,
    /// The verdict of [`CpuState::check_compatible`] against this host's
    /// [`Machine::effective_cpuid`], once computed. The state never changes
    /// after construction and neither does that CPUID, so it stays valid.
    pub(crate) compatible: OnceLock<Result<(), CpuMismatch>>,
}

/// The vCPU state a transaction checkpoint keeps: what CPL3 code can
/// change (general and segment registers, flags, vector state) plus the
/// pending events, so a vCPU stopped anywhere (a timeout, a fault in the
/// CPL0 stub) can be brought back. Control registers, MSRs, XCR0 and debug
/// registers cannot change at CPL3 without faulting and are not kept.
pub(crate) struct UserCpu {
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// `None` when the guest resets its vector state around the point the
    /// checkpoint is taken at (`GUEST_FLAG_RESETS_VECTOR_STATE`).
    xsave: Option<Box<kvm_xsave>>,
    events: kvm_vcpu_events,
}

impl UserCpu {
    /// Reads the state of a vCPU stopped at a completed hypercall.
    pub(crate) fn capture(vcpu: &mut VcpuFd, vector: bool) -> Result<Self, VmError> {
        flush_sync_regs(vcpu)?;
        Ok(Self {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: match vector {
                true => Some(Box::new(vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?)),
                false => None,
            },
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Puts the vCPU back. `anywhere`: the vCPU may have stopped outside a
    /// hypercall (the pending events and the full vector state are
    /// restored too); otherwise it stopped at a hypercall at CPL3, and the
    /// registers go through `kvm_run` with `sync_regs`.
    pub(crate) fn apply(
        &self,
        vcpu: &mut VcpuFd,
        anywhere: bool,
        sync_regs: bool,
    ) -> Result<(), VmError> {
        if let Some(xsave) = &self.xsave {
            set_xsave(vcpu, xsave).map_err(kvm("KVM_SET_XSAVE"))?;
        }
        if anywhere {
            clear_sync_regs(vcpu);
            vcpu.set_sregs(&Machine::host_sregs(&self.sregs))
                .map_err(kvm("KVM_SET_SREGS"))?;
            vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
            return vcpu
                .set_vcpu_events(&self.events)
                .map_err(kvm("KVM_SET_VCPU_EVENTS"));
        }
        set_registers(vcpu, &self.regs, &self.sregs, sync_regs)
    }
}

/// Why a snapshot's CPUID cannot run on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CpuMismatch {
    /// A feature the snapshot's CPUID has and the host's lacks (the fields
    /// of `SnapshotError::CpuMismatch`).
    Feature {
        leaf: u32,
        index: u32,
        register: &'static str,
        missing: u32,
    },
    /// The snapshot was taken on another CPU vendor (CPUID leaf 0):
    /// `SnapshotError::CpuVendorMismatch`.
    Vendor { snapshot: [u8; 12], host: [u8; 12] },
}

/// The vendor string of a CPUID table (leaf 0: EBX, EDX, ECX).
fn vendor(entries: &[kvm_cpuid_entry2]) -> [u8; 12] {
    let mut out = [0u8; 12];
    if let Some(e) = entries.iter().find(|e| e.function == 0) {
        out[..4].copy_from_slice(&e.ebx.to_le_bytes());
        out[4..8].copy_from_slice(&e.edx.to_le_bytes());
        out[8..].copy_from_slice(&e.ecx.to_le_bytes());
    }
    out
}

/// Reads every MSR of [`SAVED_MSRS`] this vCPU has. KVM_GET_MSRS stops at
/// the first MSR it cannot read (which ones differ between hosts: TSC_AUX
/// needs RDTSCP or RDPID, and some KVMs leave it out of
/// `KVM_GET_MSR_INDEX_LIST` yet read it), so the one it stopped at is left
/// out and the rest are read again.
fn read_msrs(vcpu: &VcpuFd) -> Result<Vec<kvm_msr_entry>, VmError> {
    let mut wanted: Vec<u32> = SAVED_MSRS.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmError::InvalidVcpuState {
            reason: "MSR list too long",
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if read >= wanted.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        // Bounded: one MSR fewer every round.
        wanted.remove(read);
    }
}

fn kvm(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    VmError::kvm(step)
}

impl CpuState {
    /// Reads the state of a stopped vCPU.
    pub(crate) fn capture(vcpu: &mut VcpuFd) -> Result<Self, VmError> {
        flush_sync_regs(vcpu)?;
        let msrs = read_msrs(vcpu)?;
        let cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(Self {
            compatible: OnceLock::new(),
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            msrs,
            cpuid: cpuid.as_slice().to_vec(),
        }
        .normalized())
    }

    /// The same state with the CPUID's per-CPU fields normalised (see
    /// [`normalize_cpuid`]), so that the CPUID a snapshot gives a vCPU is
    /// the same bytes whichever physical CPU the VM it was taken from, or
    /// the VM it is restored into, was created on. Applied on capture and
    /// on load (files written before normalisation hold the APIC id of the
    /// CPU they were taken on).
    pub(crate) fn normalized(mut self) -> Self {
        normalize_cpuid(&mut self.cpuid);
        self.compatible = OnceLock::new();
        self
    }

    /// Applies the state to a vCPU (CPUID first: it decides which other
    /// state KVM accepts).
    /// `KVM_SET_CPUID2` is skipped when `current` (the CPUID the vCPU
    /// already has) equals the snapshot's: it is the most expensive call.
    pub(crate) fn apply(
        &self,
        vcpu: &mut VcpuFd,
        current: Option<&[kvm_cpuid_entry2]>,
    ) -> Result<(), VmError> {
        // Registers handed over in `kvm_run` but not loaded yet would
        // override what is set here on the next run.
        clear_sync_regs(vcpu);
        if current != Some(self.cpuid.as_slice()) {
            let cpuid =
                CpuId::from_entries(&self.cpuid).map_err(|_| VmError::InvalidVcpuState {
                    reason: "too many CPUID entries",
                })?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        }
        vcpu.set_sregs(&Machine::host_sregs(&self.sregs))
            .map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        set_xsave(vcpu, &self.xsave).map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| VmError::InvalidVcpuState {
            reason: "too many MSRs",
        })?;
        // KVM_SET_MSRS stops at the first MSR it refuses and returns how
        // many it set: anything short of all of them is a failed restore.
        let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != self.msrs.len() {
            return Err(VmError::InvalidVcpuState {
                reason: "KVM refused one of the saved MSRs",
            });
        }
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
    ) -> Result<(), VmError> {
        match which {
            Registers::All => return self.apply(vcpu, current_cpuid),
            Registers::UserMode => {
                set_xsave(vcpu, &self.xsave).map_err(kvm("KVM_SET_XSAVE"))?;
            }
            Registers::NoVector => {}
        }
        set_registers(vcpu, &self.regs, &self.sregs, sync_regs)
    }

    /// Checks that `host` (the CPUID KVM supports here) has every feature
    /// bit the snapshot's CPUID advertises to the guest.
    ///
    /// Against [`Machine::effective_cpuid`] (the host CPUID every restore
    /// checks against) the verdict is computed once per snapshot and then
    /// only read: a call costs a few atomic loads, cheap enough for every
    /// in-place reset. Any other `host` is compared in full.
    pub(crate) fn check_compatible(&self, host: &CpuId) -> Result<(), CpuMismatch> {
        let effective = Machine::effective_cpuid_if_read().is_some_and(|e| std::ptr::eq(e, host));
        if effective {
            let verdict = self
                .compatible
                .get_or_init(|| self.find_missing_feature(host));
            *verdict
        } else {
            self.find_missing_feature(host)
        }
    }

    /// The first feature bit the snapshot's CPUID has and `host` lacks.
    fn find_missing_feature(&self, host: &CpuId) -> Result<(), CpuMismatch> {
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
        // Intel and AMD differ in what the same instructions do (`xrstor`,
        // `syscall` outside 64-bit mode, MSRs, topology leaves): a guest
        // that booted on one vendor is not moved to the other.
        let (snapshot_vendor, host_vendor) = (vendor(&self.cpuid), vendor(host));
        if snapshot_vendor != host_vendor {
            return Err(CpuMismatch::Vendor {
                snapshot: snapshot_vendor,
                host: host_vendor,
            });
        }
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
                    return Err(CpuMismatch::Feature {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{STACK_TOP, USER_BASE};

    /// The state of a new VM's vCPU, or `None` without KVM.
    fn state() -> Option<CpuState> {
        let mut machine = Machine::new(4 << 20, USER_BASE, STACK_TOP - 8).ok()?;
        Some(CpuState::capture(machine.vcpu()).expect("capture"))
    }

    #[test]
    fn the_cpuid_of_a_capture_or_load_holds_no_apic_id() {
        let Some(mut state) = state() else { return };
        for e in &state.cpuid {
            match e.function {
                0x1 => assert_eq!(e.ebx >> 24, 0),
                0xB | 0x1F => assert_eq!(e.edx, 0),
                _ => {}
            }
        }
        // As a file from another CPU would hold it.
        let before = state.cpuid.clone();
        for e in &mut state.cpuid {
            match e.function {
                0x1 => e.ebx |= 3 << 24,
                0xB | 0x1F => e.edx = 3,
                _ => {}
            }
        }
        assert_eq!(state.normalized().cpuid, before);
    }

    #[test]
    fn the_cached_verdict_is_the_full_comparison() {
        let Some(state) = state() else { return };
        let host = Machine::effective_cpuid().expect("effective CPUID");
        assert!(state.check_compatible(host).is_ok());
        assert!(state.check_compatible(host).is_ok());
        assert_eq!(state.compatible.get(), Some(&Ok(())));

        // A feature the host lacks: the same error cached and uncached.
        let mut lacking = state.normalized();
        let leaf7 = lacking
            .cpuid
            .iter_mut()
            .find(|e| e.function == 7 && e.index == 0)
            .expect("leaf 7");
        let host7 = host
            .as_slice()
            .iter()
            .find(|e| e.function == 7 && e.index == 0)
            .map_or(0, |e| e.ebx);
        let Some(bit) = (0..32).map(|b| 1u32 << b).rev().find(|b| host7 & b == 0) else {
            return;
        };
        leaf7.ebx |= bit;
        let copy = CpuId::from_entries(host.as_slice()).expect("copy");
        let expected = format!("{:?}", lacking.check_compatible(&copy));
        assert!(
            matches!(
                lacking.check_compatible(&copy),
                Err(CpuMismatch::Feature { leaf: 7, .. })
            ),
            "{expected}"
        );
        assert!(
            lacking.compatible.get().is_none(),
            "only the host's is cached"
        );
        for _ in 0..2 {
            assert_eq!(format!("{:?}", lacking.check_compatible(host)), expected);
        }
        assert!(lacking.compatible.get().is_some());
    }

    #[test]
    fn a_restore_fails_when_kvm_refuses_a_saved_msr() {
        let Some(mut state) = state() else { return };
        // Every MSR the capture could read goes back.
        let mut machine = Machine::new(4 << 20, USER_BASE, STACK_TOP - 8).expect("vm");
        state.apply(machine.vcpu(), None).expect("apply");
        // One this KVM does not know (as from a host with other MSRs):
        // KVM_SET_MSRS sets the ones before it and stops.
        state.msrs.push(kvm_msr_entry {
            index: 0x4000_00FF,
            data: 1,
            ..Default::default()
        });
        let err = state.apply(machine.vcpu(), None).unwrap_err();
        assert!(matches!(err, VmError::InvalidVcpuState { .. }), "{err:?}");
    }

    #[test]
    fn a_snapshot_from_another_cpu_vendor_is_refused() {
        let Some(mut state) = state() else { return };
        let host = Machine::effective_cpuid().expect("effective CPUID");
        let leaf0 = state
            .cpuid
            .iter_mut()
            .find(|e| e.function == 0)
            .expect("leaf 0");
        let theirs: &[u8; 12] = if vendor(host.as_slice()) == *b"GenuineIntel" {
            b"AuthenticAMD"
        } else {
            b"GenuineIntel"
        };
        let word = |i: usize| u32::from_le_bytes(theirs[i..i + 4].try_into().expect("4 bytes"));
        (leaf0.ebx, leaf0.edx, leaf0.ecx) = (word(0), word(4), word(8));
        let state = state.normalized();
        assert_eq!(
            state.check_compatible(host),
            Err(CpuMismatch::Vendor {
                snapshot: *theirs,
                host: vendor(host.as_slice()),
            })
        );
    }
}
