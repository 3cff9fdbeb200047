//! One VM's KVM resources as the core uses them: the VM and vCPU fds and
//! guest RAM (owned by `sys::kvm::VmFds`), the dirty log, and the vCPU's
//! initial long-mode, CPL3 state. Dropping a [`Machine`] releases all of
//! them.

use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, CpuId,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::error::VmError;
use super::layout::{self, GDT_ADDR, IDT_ADDR, PML4_ADDR, TSS_ADDR, TSS_SEL, USER_CS, USER_DS};
use crate::sys::kvm::{KvmFailed, VmFds};
use crate::sys::memory::{GuestRam, Stopped};

/// Path of the KVM device.
pub(crate) const KVM_PATH: &str = "/dev/kvm";

/// What the host's KVM supports, read once per process.
struct HostKvm {
    kvm: Kvm,
    /// KVM can load general and system registers from `kvm_run` on entry
    /// (`KVM_CAP_SYNC_REGS`), saving an ioctl each.
    sync_regs: bool,
    cpuid: CpuId,
    xcr0: Option<u64>,
    /// The TR type new vCPUs get: see [`TCG_TSS_SWITCH`].
    tr_type: u8,
}

/// The environment variable that makes new vCPUs load TR with an
/// *available* 64-bit TSS (type 9) instead of a busy one (type 11).
///
/// It exists only for QEMU's TCG emulator, which snapvm's nested-SVM CI
/// stage (`.ci/nested-svm.sh`) runs KVM inside: TCG checks a CPL3 `out`
/// against the I/O permission bitmap only when TR holds an available TSS,
/// so every hypercall would fault with #GP there. Real CPUs (and KVM on
/// VT-x, whose entry checks demand a busy TSS) take the default; never set
/// it outside that emulator.
pub const TCG_TSS_SWITCH: &str = "SNAPVM_TCG_AVAILABLE_TSS";

/// TR type of a busy 64-bit TSS: what real CPUs load and VMX entry demands.
const TR_BUSY_TSS: u8 = 0xB;
/// TR type of an available 64-bit TSS (see [`TCG_TSS_SWITCH`]).
const TR_AVAILABLE_TSS: u8 = 0x9;

static HOST: OnceLock<HostKvm> = OnceLock::new();

/// See [`Machine::effective_cpuid`].
static EFFECTIVE: OnceLock<CpuId> = OnceLock::new();

fn host() -> Result<&'static HostKvm, VmError> {
    if let Some(host) = HOST.get() {
        return Ok(host);
    }
    let kvm = Kvm::new().map_err(|e| VmError::KvmUnavailable {
        path: KVM_PATH.into(),
        source: std::io::Error::from_raw_os_error(e.errno()),
        hint: kvm_hint(e.errno()),
    })?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    // KVM fills the topology fields from the CPU this thread runs on.
    normalize_cpuid(cpuid.as_mut_slice());
    let xcr0 = supported_xcr0(&cpuid);
    let wanted = (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS) as i32;
    let sync_regs = kvm.check_extension_int(kvm_ioctls::Cap::SyncRegs) & wanted == wanted;
    let tr_type = match std::env::var_os(TCG_TSS_SWITCH) {
        Some(v) if v == "1" => TR_AVAILABLE_TSS,
        _ => TR_BUSY_TSS,
    };
    Ok(HOST.get_or_init(|| HostKvm {
        kvm,
        sync_regs,
        cpuid,
        xcr0,
        tr_type,
    }))
}

/// Makes the per-CPU fields of a CPUID table independent of the physical
/// CPU it was read on: the vCPU's own APIC id (0, the only vCPU's id) in
/// leaf 0x1 EBX[31:24] and in EDX of every sub-leaf of leaves 0xB and 0x1F
/// (x2APIC id), and AMD's leaf 0x8000_001E (extended APIC id in EAX, core
/// id in EBX[7:0], node id in ECX[7:0]).
///
/// `KVM_GET_SUPPORTED_CPUID` copies these fields from the CPU the calling
/// thread runs on, so without this two VMs of one host differ in them, and
/// KVM refuses to give a vCPU that has run a CPUID other than the one it
/// has (`KVM_SET_CPUID2` fails with `EINVAL`). Every CPUID a vCPU is given
/// and every CPUID a snapshot holds goes through this function.
pub(crate) fn normalize_cpuid(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries {
        match e.function {
            0x1 => e.ebx &= 0x00FF_FFFF,
            0xB | 0x1F => e.edx = 0,
            0x8000_001E => {
                e.eax = 0;
                e.ebx &= !0xFF;
                e.ecx &= !0xFF;
            }
            _ => {}
        }
    }
}

fn kvm_hint(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => {
            "KVM is not available: load the kvm module (kvm_intel or kvm_amd) or run on a host with virtualization enabled"
        }
        libc::EACCES | libc::EPERM => {
            "this user may not use KVM: add it to the group owning the device (usually `kvm`: sudo usermod -aG kvm $USER, then log in again) or grant access with `sudo setfacl -m u:$USER:rw <device>`"
        }
        _ => "check that the device exists, is KVM and is readable and writable by this user",
    }
}

/// The XCR0 value to give guests: x87, SSE, AVX and AVX-512 state where the
/// host supports them, or `None` without XSAVE.
fn supported_xcr0(cpuid: &CpuId) -> Option<u64> {
    let entries = cpuid.as_slice();
    let leaf1 = entries.iter().find(|e| e.function == 1)?;
    if leaf1.ecx & (1 << 26) == 0 {
        return None;
    }
    let leaf_d = entries.iter().find(|e| e.function == 0xD && e.index == 0)?;
    let supported = u64::from(leaf_d.eax) | (u64::from(leaf_d.edx) << 32);
    // x87 | SSE | AVX | opmask | ZMM_Hi256 | Hi16_ZMM
    Some(supported & 0xE7 | 0x3)
}

/// Checks that KVM can be opened, with the same error `VmInstance::new`
/// gives when it cannot (the error says how to fix it).
pub fn check_kvm() -> Result<(), VmError> {
    host().map(|_| ())
}

/// Checks that the KVM device at `path` (normally `/dev/kvm`) can be opened
/// and answers as KVM.
pub fn check_kvm_device(path: &std::path::Path) -> Result<(), VmError> {
    let unavailable = |errno: i32| VmError::KvmUnavailable {
        path: path.to_path_buf(),
        source: std::io::Error::from_raw_os_error(errno),
        hint: kvm_hint(errno),
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| unavailable(libc::EINVAL))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| unavailable(e.errno()))?;
    if kvm.get_api_version() != 12 {
        return Err(unavailable(libc::ENOTTY));
    }
    Ok(())
}

/// A VM with one vCPU and its memory.
pub(crate) struct Machine {
    /// The VM and vCPU fds and guest RAM. The RAM is shared with a polling
    /// VM's caller thread, which writes requests and reads results while
    /// the vCPU thread is inside `KVM_RUN`.
    fds: VmFds,
    dirty_log: bool,
    /// The CPUID last given to the vCPU (as the vCPU reports it), so a
    /// restore can skip `KVM_SET_CPUID2` when nothing changes.
    pub(crate) cpuid: Option<Vec<kvm_bindings::kvm_cpuid_entry2>>,
}

impl From<KvmFailed> for VmError {
    fn from(e: KvmFailed) -> Self {
        VmError::Kvm {
            step: e.step,
            source: e.source,
        }
    }
}

impl Machine {
    /// Creates a VM and vCPU with `memory_size` bytes of zeroed RAM, its
    /// system area written and the vCPU in 64-bit mode at CPL3, about to
    /// execute `entry` with the stack pointer `rsp`.
    pub(crate) fn new(memory_size: u64, entry: u64, rsp: u64) -> Result<Self, VmError> {
        let ram = GuestRam::new(memory_size).map_err(|source| VmError::MapMemory {
            size: memory_size,
            source,
        })?;
        layout::write_system_area(&ram).map_err(|e| VmError::InvalidConfig {
            field: "memory_size",
            reason: format!("too small for the system area ({:#x}+{:#x})", e.addr, e.len),
        })?;
        let mut machine = Self::create(ram, false)?;
        machine.setup_vcpu(host()?, entry, rsp)?;
        machine.cpuid = machine
            .vcpu()
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .ok()
            .map(|c| c.as_slice().to_vec());
        Ok(machine)
    }

    /// Creates a VM and one vCPU over `ram`, registered as memory slot 0,
    /// with dirty-page logging if asked. The vCPU state is KVM's reset state.
    pub(crate) fn create(ram: GuestRam, dirty_log: bool) -> Result<Self, VmError> {
        let fds = VmFds::new(&host()?.kvm, ram, dirty_log)?;
        Ok(Self {
            fds,
            dirty_log,
            cpuid: None,
        })
    }

    /// The vCPU.
    pub(crate) fn vcpu(&mut self) -> &mut VcpuFd {
        self.fds.vcpu()
    }

    /// Guest memory (bounds-checked `vm-memory` accessors).
    pub(crate) fn ram(&self) -> &GuestRam {
        self.fds.ram()
    }

    /// Guest memory for a polling VM's caller thread.
    pub(crate) fn shared_ram(&self) -> Arc<GuestRam> {
        self.fds.shared_ram()
    }

    /// Guest memory with the vCPU stopped (see [`Stopped`]): `&mut self`
    /// keeps the vCPU out of `KVM_RUN` while the token lives.
    pub(crate) fn stopped(&mut self) -> Stopped<'_> {
        self.fds.stopped()
    }

    /// The vCPU and the CPUID last given to it, borrowed together.
    pub(crate) fn vcpu_and_cpuid(&mut self) -> (&mut VcpuFd, Option<&[kvm_cpuid_entry2]>) {
        (self.fds.vcpu(), self.cpuid.as_deref())
    }

    /// Turns dirty-page logging of guest memory on or off.
    pub(crate) fn set_dirty_log(&mut self, on: bool) -> Result<(), VmError> {
        if self.dirty_log != on {
            self.fds.set_dirty_log(on)?;
            self.dirty_log = on;
        }
        Ok(())
    }

    /// Returns the bitmap of pages the guest wrote since they were last
    /// cleared, one bit per 4 KiB page, and clears (write-protects) them all.
    pub(crate) fn take_dirty_log(&self) -> Result<Vec<u64>, VmError> {
        let log = self.peek_dirty_log()?;
        self.clear_dirty_log(0, &log)?;
        Ok(log)
    }

    /// Returns the bitmap of pages the guest wrote since they were last
    /// cleared. With manual protection the pages stay writable and their
    /// bits set until [`Self::clear_dirty_log`]; without it, KVM clears and
    /// write-protects them now.
    pub(crate) fn peek_dirty_log(&self) -> Result<Vec<u64>, VmError> {
        self.fds
            .get_dirty_log()
            .map_err(VmError::kvm("KVM_GET_DIRTY_LOG"))
    }

    /// Clears the given bits of the dirty log (`bitmap` word 0 covers pages
    /// `first_word * 64..`) and write-protects those pages again, so the
    /// next guest write to each is logged. A page left out stays writable
    /// and keeps its bit set: it is reported dirty by every later read. (A
    /// no-op without manual protection.)
    pub(crate) fn clear_dirty_log(&self, first_word: usize, bitmap: &[u64]) -> Result<(), VmError> {
        if !self.fds.manual_protect() || bitmap.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let size = self.ram().size();
        let out_of_range = || VmError::MemoryOutOfRange { addr: 0, len: size };
        let pages = size / crate::abi::PAGE_SIZE;
        let first_page = first_word as u64 * 64;
        let num_pages = bitmap.len() as u64 * 64;
        if first_page + num_pages > pages || u32::try_from(num_pages).is_err() {
            return Err(out_of_range());
        }
        self.fds
            .clear_dirty_log(first_page, bitmap)
            .map_err(VmError::kvm("KVM_CLEAR_DIRTY_LOG"))
    }

    /// Whether registers can be handed to KVM through `kvm_run` (see
    /// [`HostKvm::sync_regs`]).
    pub(crate) fn sync_regs_supported() -> bool {
        host().is_ok_and(|h| h.sync_regs)
    }

    /// `sregs` as this host's vCPUs must get them: TR with the type this
    /// host loads (see [`TCG_TSS_SWITCH`]). KVM on AMD-V reads TR back as
    /// busy whatever was set, so a snapshot holds a busy TSS; under the
    /// emulator switch it must become available again on every restore.
    /// On any other host this is the busy type the state already has.
    pub(crate) fn host_sregs(sregs: &kvm_sregs) -> kvm_sregs {
        let mut sregs = *sregs;
        sregs.tr.type_ = host().map_or(TR_BUSY_TSS, |h| h.tr_type);
        sregs
    }

    /// The CPUID a vCPU on this host actually presents after being given
    /// everything KVM reports as supported. Some KVM implementations (PVM)
    /// present more than `KVM_GET_SUPPORTED_CPUID` lists, so snapshots are
    /// checked against this, read once per process from a probe vCPU
    /// (normalised with [`normalize_cpuid`]). After the first call this is
    /// one atomic load, and the result is always the same `&'static`.
    pub(crate) fn effective_cpuid() -> Result<&'static CpuId, VmError> {
        if let Some(cpuid) = EFFECTIVE.get() {
            return Ok(cpuid);
        }
        let host = host()?;
        let vm = host
            .kvm
            .create_vm()
            .map_err(VmError::kvm("KVM_CREATE_VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&host.cpuid)
            .map_err(VmError::kvm("KVM_SET_CPUID2"))?;
        let mut cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::kvm("KVM_GET_CPUID2"))?;
        normalize_cpuid(cpuid.as_mut_slice());
        Ok(EFFECTIVE.get_or_init(|| cpuid))
    }

    /// [`Self::effective_cpuid`] if it was read already (never probes).
    pub(crate) fn effective_cpuid_if_read() -> Option<&'static CpuId> {
        EFFECTIVE.get()
    }

    fn setup_vcpu(&mut self, host: &HostKvm, entry: u64, rsp: u64) -> Result<(), VmError> {
        let vcpu = self.vcpu();
        vcpu.set_cpuid2(&host.cpuid)
            .map_err(VmError::kvm("KVM_SET_CPUID2"))?;

        let mut sregs = vcpu.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
        let flat = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector,
            type_,
            present: 1,
            dpl: (selector & 3) as u8,
            db,
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = flat(USER_CS, 0xB, 1, 0);
        let data = flat(USER_DS, 0x3, 0, 1);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: TSS_ADDR,
            limit: layout::TSS_LIMIT,
            selector: TSS_SEL,
            type_: host.tr_type,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.ldt = kvm_segment {
            unusable: 1,
            ..Default::default()
        };
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (layout::gdt_entries().len() * 8 - 1) as u16;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = (layout::VECTORS * 16 - 1) as u16;
        // PE | MP | ET | NE | WP | PG
        sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
        sregs.cr3 = PML4_ADDR;
        // PAE | OSFXSR | OSXMMEXCPT, plus OSXSAVE when the host has XSAVE.
        sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
        if host.xcr0.is_some() {
            sregs.cr4 |= 1 << 18;
        }
        // LME | LMA | NXE
        sregs.efer = (1 << 8) | (1 << 10) | (1 << 11);
        vcpu.set_sregs(&sregs)
            .map_err(VmError::kvm("KVM_SET_SREGS"))?;

        if let Some(xcr0) = host.xcr0 {
            let mut xcrs = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = xcr0;
            vcpu.set_xcrs(&xcrs).map_err(VmError::kvm("KVM_SET_XCRS"))?;
        }

        let fpu = kvm_fpu {
            fcw: 0x37F,
            mxcsr: 0x1F80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(VmError::kvm("KVM_SET_FPU"))?;

        let regs = kvm_regs {
            rip: entry,
            rsp,
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(VmError::kvm("KVM_SET_REGS"))
    }
}

/// `KVM_CREATE_VM` + `KVM_CREATE_VCPU` and nothing else (a baseline).
pub(crate) fn create_empty() -> Result<(), VmError> {
    let host = host()?;
    let vm = host
        .kvm
        .create_vm()
        .map_err(VmError::kvm("KVM_CREATE_VM"))?;
    let _vcpu = vm.create_vcpu(0).map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_kvm_device_names_the_path_it_opened() {
        for (path, errno) in [
            ("/nonexistent/snapvm-kvm", libc::ENOENT),
            ("/dev/null", libc::ENOTTY),
        ] {
            let err = check_kvm_device(std::path::Path::new(path)).unwrap_err();
            match &err {
                VmError::KvmUnavailable {
                    path: reported,
                    source,
                    ..
                } => {
                    assert_eq!(reported, std::path::Path::new(path));
                    assert_eq!(source.raw_os_error(), Some(errno), "{path}");
                }
                other => panic!("{path}: {other:?}"),
            }
            let text = err.to_string();
            assert!(text.contains(path), "{text}");
            assert!(!text.contains("/dev/kvm"), "{text}");
        }
    }
}
