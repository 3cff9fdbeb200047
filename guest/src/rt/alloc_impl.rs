//! The guest's global allocator: a first-fit heap over the memory the host
//! reserves between the program image and the end of guest memory.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};

use linked_list_allocator::Heap;

use super::GuestCell;

struct GuestAllocator {
    heap: GuestCell<Heap>,
    used: GuestCell<usize>,
    /// Size of the last allocation that failed (0: none since the last reset).
    failed: GuestCell<usize>,
}

#[global_allocator]
static ALLOCATOR: GuestAllocator = GuestAllocator {
    heap: GuestCell::new(Heap::empty()),
    used: GuestCell::new(0),
    failed: GuestCell::new(0),
};

/// Takes (and clears) the size of the last failed allocation.
pub(crate) fn take_failed_allocation() -> usize {
    // SAFETY: single-threaded guest (see `GuestCell`).
    let failed = unsafe { &mut *ALLOCATOR.failed.get() };
    // Write only when there is something to clear: a store of the same
    // value would still dirty the page, which a reset then has to rewind.
    if *failed == 0 {
        0
    } else {
        core::mem::take(failed)
    }
}

/// Hands the heap region `[start, end)` to the allocator. Called once at boot.
pub(crate) fn init(start: u64, end: u64) {
    let size = end.saturating_sub(start) as usize;
    // SAFETY: the host reserves `[heap_start, heap_end)` for the heap: it is
    // mapped read/write, lies above the program image and below the end of
    // guest memory, and nothing else uses it. `init` runs once, before any
    // allocation.
    unsafe { (*ALLOCATOR.heap.get()).init(start as *mut u8, size) }
}

/// Bytes currently allocated on the guest heap.
pub fn heap_used() -> usize {
    // SAFETY: single-threaded guest (see `GuestCell`).
    unsafe { *ALLOCATOR.used.get() }
}

// SAFETY: `alloc` returns blocks from the heap that fit `layout` or null, and
// `dealloc` hands back only blocks `alloc` returned with the same layout; the
// heap itself is only touched from the guest's single thread.
unsafe impl GlobalAlloc for GuestAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded guest (see `GuestCell`).
        let heap = unsafe { &mut *self.heap.get() };
        match heap.allocate_first_fit(layout) {
            Ok(block) => {
                // SAFETY: as above.
                unsafe { *self.used.get() += layout.size() };
                block.as_ptr()
            }
            Err(()) => {
                // SAFETY: as above.
                unsafe { *self.failed.get() = layout.size() };
                ptr::null_mut()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: single-threaded guest; `ptr` came from `alloc` with this
        // layout (GlobalAlloc contract), so it is non-null and ours.
        unsafe {
            (*self.heap.get()).deallocate(NonNull::new_unchecked(ptr), layout);
            *self.used.get() -= layout.size();
        }
    }
}
