//! The KVM objects of one VM: the VM fd, its only vCPU and the guest memory
//! registered as its only memory slot, owned together by [`VmFds`] so that
//! the memory outlives the slot and `&mut VmFds` proves the vCPU is not
//! running (the [`Stopped`] token).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, kvm_xsave, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::memory::{GuestRam, Stopped};

/// A KVM ioctl that failed, and which one.
#[derive(Debug)]
pub(crate) struct KvmFailed {
    pub(crate) step: &'static str,
    pub(crate) source: kvm_ioctls::Error,
}

fn failed(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmFailed {
    move |source| KvmFailed { step, source }
}

/// A VM with one vCPU and its memory as slot 0.
///
/// The VM fd stays private: no second vCPU can be made, so the vCPU here is
/// the only thing that runs guest code on this memory, and running it
/// (`VcpuFd::run`) needs `&mut` of it, reachable only through
/// [`Self::vcpu`]. Hence [`Self::stopped`]: while its token borrows `self`,
/// no `KVM_RUN` and no other vCPU ioctl on this memory is in progress.
pub(crate) struct VmFds {
    // Field order is drop order: the vCPU and VM fds close before the RAM
    // they reference is released.
    vcpu: VcpuFd,
    /// The descriptor number `vcpu` had when it was made here (see
    /// [`Self::stopped`]).
    vcpu_fd: RawFd,
    vm: VmFd,
    ram: Arc<GuestRam>,
    /// KVM leaves pages writable after `KVM_GET_DIRTY_LOG` until they are
    /// cleared explicitly (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    manual_protect: bool,
}

impl VmFds {
    /// Creates a VM and its vCPU 0 over `ram`, registered as memory slot 0
    /// (with dirty-page logging if asked), and turns on manual dirty-log
    /// protection where KVM offers it. The vCPU state is KVM's reset state.
    pub(crate) fn new(kvm: &Kvm, ram: GuestRam, dirty_log: bool) -> Result<Self, KvmFailed> {
        let vm = kvm.create_vm().map_err(failed("KVM_CREATE_VM"))?;
        // `set_xsave` passes the legacy 4 KiB `kvm_xsave`: refuse a VM
        // whose vCPU state could be larger (the process was granted
        // dynamic XSTATE features for guests, such as AMX tiles, by
        // `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`; snapvm never asks, but
        // a library it shares the process with could). 0: no XSAVE2, so
        // the legacy size is all there is.
        let xsave_size = vm.check_extension_int(Cap::Xsave2);
        if usize::try_from(xsave_size).is_ok_and(|n| n > std::mem::size_of::<kvm_xsave>()) {
            return Err(KvmFailed {
                step: "KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2): the vCPU state is larger than 4 KiB \
                       (dynamic XSTATE features such as AMX were enabled for guests in this \
                       process); snapvm does not support them",
                source: kvm_ioctls::Error::new(libc::EOPNOTSUPP),
            });
        }
        let manual_protect = enable_manual_protect(&vm);
        set_memslot(&vm, &ram, dirty_log)?;
        let vcpu = vm.create_vcpu(0).map_err(failed("KVM_CREATE_VCPU"))?;
        Ok(Self {
            vcpu_fd: vcpu.as_raw_fd(),
            vcpu,
            vm,
            ram: Arc::new(ram),
            manual_protect,
        })
    }

    /// The vCPU.
    pub(crate) fn vcpu(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }

    /// Guest memory (`vm-memory` accessors, right at any time).
    pub(crate) fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest memory for a thread that posts calls while the vCPU runs (a
    /// polling caller); see [`Stopped`] for the rule it follows.
    pub(crate) fn shared_ram(&self) -> Arc<GuestRam> {
        Arc::clone(&self.ram)
    }

    /// Guest memory with the vCPU stopped: plain copies and slices.
    ///
    /// # Panics
    /// If the vCPU fd was swapped for another VM's (`std::mem::swap` on
    /// [`Self::vcpu`]s), which nothing in the crate does.
    pub(crate) fn stopped(&mut self) -> Stopped<'_> {
        // The vCPU in `self.vcpu` is this VM's own: two open descriptors
        // never share a number, so a vCPU swapped in from elsewhere (while
        // this VM's runs somewhere else) fails this check.
        assert_eq!(
            self.vcpu.as_raw_fd(),
            self.vcpu_fd,
            "the vCPU fd of a VM was replaced"
        );
        Stopped::of_vm(&self.ram)
    }

    /// Whether manual dirty-log protection is on.
    pub(crate) fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Registers the memory again, with dirty-page logging on or off.
    pub(crate) fn set_dirty_log(&mut self, on: bool) -> Result<(), KvmFailed> {
        set_memslot(&self.vm, &self.ram, on)
    }

    /// `KVM_GET_DIRTY_LOG` of slot 0: one bit per 4 KiB page.
    pub(crate) fn get_dirty_log(&self) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.vm.get_dirty_log(0, self.ram.size() as usize)
    }

    /// `KVM_CLEAR_DIRTY_LOG` of slot 0: clears the bits set in `bitmap`,
    /// which covers the pages from `first_page` (a multiple of 64) on, and
    /// write-protects those pages again. KVM checks the range against the
    /// slot.
    pub(crate) fn clear_dirty_log(
        &self,
        first_page: u64,
        bitmap: &[u64],
    ) -> Result<(), kvm_ioctls::Error> {
        let num_pages = u32::try_from(bitmap.len() as u64 * 64)
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        let clear = kvm_bindings::kvm_clear_dirty_log {
            slot: 0,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: KVM_CLEAR_DIRTY_LOG reads `num_pages` bits from
        // `dirty_bitmap`, which points at `bitmap`, exactly that many bits
        // long and alive for the call; it writes nothing back.
        let rc = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, kvm_clear_dirty_log_ioctl(), &clear)
        };
        if rc != 0 {
            return Err(kvm_ioctls::Error::last());
        }
        Ok(())
    }
}

vmm_sys_util::ioctl_iowr_nr!(
    kvm_clear_dirty_log_ioctl,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// Turns on manual dirty-log protection where KVM offers it; returns
/// whether it is on.
fn enable_manual_protect(vm: &VmFd) -> bool {
    let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    let supported = vm.check_extension_raw(u64::from(cap)) as u32;
    if supported & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return false;
    }
    let enable = kvm_bindings::kvm_enable_cap {
        cap,
        args: [
            u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&enable).is_ok()
}

fn set_memslot(vm: &VmFd, ram: &GuestRam, dirty_log: bool) -> Result<(), KvmFailed> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: the region describes `ram`, a live mapping of exactly its
    // size, registered (or re-registered with other flags) as slot 0, the
    // VM's only slot. The mapping outlives the slot: `vm` is either a local
    // of `VmFds::new` (dropped before its `ram` argument on every path) or
    // the fd of a `VmFds`, which closes its fds before it releases the
    // `Arc<GuestRam>` it holds (field order).
    unsafe { vm.set_user_memory_region(region) }.map_err(failed("KVM_SET_USER_MEMORY_REGION"))
}

/// `KVM_SET_XSAVE` with the legacy 4 KiB `kvm_xsave`.
pub(crate) fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: KVM_SET_XSAVE reads as many bytes at `xsave` as the vCPU's
    // XSAVE area has: the 4 KiB of `kvm_xsave`, unless the process enabled
    // dynamic XSTATE features for guests (`arch_prctl` with
    // `ARCH_REQ_XCOMP_GUEST_PERM`, e.g. AMX), which snapvm never does, and
    // `VmFds::new` refuses a VM whose KVM_CAP_XSAVE2 size says otherwise
    // (the guest's CPUID, fixed when the vCPU is set up, cannot offer
    // features granted later). `xsave` lives for the call, and the kernel
    // writes nothing back.
    unsafe { vcpu.set_xsave(xsave) }
}
