//! The guest's system structures: page tables, GDT, IDT, TSS and the CPL0
//! exception stubs, written into the supervisor-only system area.
//!
//! Guest functions run at CPL3. The only CPL0 code is one stub per exception
//! vector: it pushes the vector (and a zero error code where the CPU pushes
//! none) onto the CPL0 stack and writes to [`PORT_FAULT`]; the host then reads
//! the exception frame from guest memory.

use crate::abi::{
    ABI_PAGE_ADDR, HUGE_PAGE_SIZE, PAGE_SIZE, PORT_FAULT, PORT_HYPERCALL, STACK_BOTTOM,
    STACK_GUARD_ADDR, STACK_TOP, SYSTEM_AREA_END, SYSTEM_AREA_START,
};
use crate::sys::memory::{GuestRam, OutOfRange};

/// GDT (6 descriptors, the TSS one takes two slots).
pub(crate) const GDT_ADDR: u64 = 0x2000;
/// IDT (32 gates).
pub(crate) const IDT_ADDR: u64 = 0x3000;
/// TSS followed by the I/O permission bitmap.
pub(crate) const TSS_ADDR: u64 = 0x4000;
/// Exception stubs, 16 bytes each.
pub(crate) const STUBS_ADDR: u64 = 0x5000;
/// Top of the CPL0 stack (TSS.RSP0); the stack occupies the 8 KiB below.
pub(crate) const RSP0: u64 = 0x8000;
/// Top of the double-fault stack (TSS.IST1).
pub(crate) const IST1: u64 = 0xA000;
/// Page-map level 4.
pub(crate) const PML4_ADDR: u64 = 0xA000;
/// The one page-directory-pointer table (covers 512 GiB).
pub(crate) const PDPT_ADDR: u64 = 0xB000;
/// Page table for the first 2 MiB (4 KiB pages).
pub(crate) const PT0_ADDR: u64 = 0xC000;
/// First page directory; one per GiB follows.
pub(crate) const PD_ADDR: u64 = 0xD000;
/// Number of exception vectors with stubs.
pub(crate) const VECTORS: u64 = 32;

/// Selectors.
pub(crate) const KERNEL_CS: u16 = 0x08;
pub(crate) const USER_DS: u16 = 0x18 | 3;
pub(crate) const USER_CS: u16 = 0x20 | 3;
pub(crate) const TSS_SEL: u16 = 0x28;

/// Size of the TSS proper.
const TSS_SIZE: u64 = 104;
/// Bytes of I/O bitmap: ports 0..=255, then the required 0xFF terminator.
const IOPB_BYTES: u64 = 32;
/// TSS limit covering the bitmap and its terminator.
pub(crate) const TSS_LIMIT: u32 = (TSS_SIZE + IOPB_BYTES) as u32;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// Vectors for which the CPU pushes an error code.
const HAS_ERROR_CODE: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];

const _: () = {
    assert!(GDT_ADDR >= SYSTEM_AREA_START && PD_ADDR < SYSTEM_AREA_END);
    assert!(STUBS_ADDR + VECTORS * 16 <= 0x6000);
    assert!((PORT_HYPERCALL as u64) + 3 < IOPB_BYTES * 8);
    assert!((PORT_FAULT as u64) < 256);
};

/// Largest memory the page-directory area can map.
const MAX_MAPPED: u64 = ((SYSTEM_AREA_END - PD_ADDR) / PAGE_SIZE) << 30;
const _: () = assert!(MAX_MAPPED >= super::config::MAX_MEMORY_SIZE);

/// Writes every system structure for a guest of `ram.size()` bytes.
pub(crate) fn write_system_area(ram: &GuestRam) -> Result<(), OutOfRange> {
    write_page_tables(ram)?;
    write_gdt(ram)?;
    write_idt(ram)?;
    write_tss(ram)?;
    write_stubs(ram)
}

/// [`write_system_area`] for callers outside `vm`, with a typed error.
pub(crate) fn write_system_area_checked(ram: &GuestRam) -> Result<(), super::VmError> {
    write_system_area(ram).map_err(|e| super::VmError::MemoryOutOfRange {
        addr: e.addr,
        len: e.len,
    })
}

/// Guest page numbers of every page-table page for a guest of `size` bytes.
pub(crate) fn page_table_pages(size: u64) -> impl Iterator<Item = u64> {
    let gibs = size.div_ceil(1 << 30);
    [PML4_ADDR, PDPT_ADDR, PT0_ADDR]
        .into_iter()
        .chain((0..gibs).map(|i| PD_ADDR + i * PAGE_SIZE))
        .map(|addr| addr / PAGE_SIZE)
}

fn write_entries(ram: &GuestRam, addr: u64, entries: &[u64]) -> Result<(), OutOfRange> {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(addr, &bytes)
}

fn write_page_tables(ram: &GuestRam) -> Result<(), OutOfRange> {
    let size = ram.size();
    let table = PRESENT | WRITABLE | USER;
    write_entries(ram, PML4_ADDR, &[PDPT_ADDR | table])?;

    let gibs = size.div_ceil(1 << 30);
    let pdpt: Vec<u64> = (0..gibs)
        .map(|i| (PD_ADDR + i * PAGE_SIZE) | table)
        .collect();
    write_entries(ram, PDPT_ADDR, &pdpt)?;

    // 2 MiB pages for everything above the first 2 MiB; the first entry
    // points at the 4 KiB table.
    let huge_pages = size / HUGE_PAGE_SIZE;
    let mut pd: Vec<u64> = Vec::with_capacity(huge_pages as usize);
    pd.push(PT0_ADDR | table);
    pd.extend((1..huge_pages).map(|i| (i * HUGE_PAGE_SIZE) | PRESENT | WRITABLE | USER | HUGE));
    write_entries(ram, PD_ADDR, &pd)?;

    // The first 2 MiB in 4 KiB pages: null guard, ABI page, supervisor-only
    // system area, stack guard, user stack.
    let pt0: Vec<u64> = (0..512u64)
        .map(|i| {
            let addr = i * PAGE_SIZE;
            if addr == 0 || addr == STACK_GUARD_ADDR {
                0
            } else if addr == ABI_PAGE_ADDR || (STACK_BOTTOM..STACK_TOP).contains(&addr) {
                addr | PRESENT | WRITABLE | USER
            } else {
                addr | PRESENT | WRITABLE
            }
        })
        .collect();
    write_entries(ram, PT0_ADDR, &pt0)
}

/// A code or data segment descriptor (flat, 4 GiB limit).
const fn segment(access: u64, flags: u64) -> u64 {
    0xFFFF | (access << 40) | (0xF << 48) | (flags << 52)
}

pub(crate) fn gdt_entries() -> [u64; 7] {
    let tss_low = (TSS_LIMIT as u64 & 0xFFFF)
        | ((TSS_ADDR & 0xFF_FFFF) << 16)
        | (0x8B << 40) // present, 64-bit TSS (busy)
        | (((TSS_LIMIT as u64 >> 16) & 0xF) << 48)
        | (((TSS_ADDR >> 24) & 0xFF) << 56);
    [
        0,
        segment(0x9B, 0xA), // kernel code: present, DPL0, exec/read, L=1, G=1
        segment(0x93, 0xC), // kernel data
        segment(0xF3, 0xC), // user data: DPL3
        segment(0xFB, 0xA), // user code: DPL3, L=1
        tss_low,
        TSS_ADDR >> 32,
    ]
}

fn write_gdt(ram: &GuestRam) -> Result<(), OutOfRange> {
    write_entries(ram, GDT_ADDR, &gdt_entries())
}

fn write_idt(ram: &GuestRam) -> Result<(), OutOfRange> {
    let mut gates = Vec::with_capacity(VECTORS as usize * 2);
    for vector in 0..VECTORS {
        let handler = STUBS_ADDR + vector * 16;
        let ist = u64::from(vector == 8); // #DF on its own stack
        let low = (handler & 0xFFFF)
            | (u64::from(KERNEL_CS) << 16)
            | (ist << 32)
            | (0x8E << 40) // present, DPL0, 64-bit interrupt gate
            | (((handler >> 16) & 0xFFFF) << 48);
        gates.push(low);
        gates.push(handler >> 32);
    }
    write_entries(ram, IDT_ADDR, &gates)
}

fn write_tss(ram: &GuestRam) -> Result<(), OutOfRange> {
    let mut tss = [0u8; (TSS_SIZE + IOPB_BYTES + 1) as usize];
    tss[4..12].copy_from_slice(&RSP0.to_le_bytes());
    tss[36..44].copy_from_slice(&IST1.to_le_bytes());
    tss[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    // Deny every port, then allow the 4 bytes of the hypercall port (a 32-bit
    // `out` is checked against four consecutive bits).
    tss[TSS_SIZE as usize..].fill(0xFF);
    for port in PORT_HYPERCALL..PORT_HYPERCALL + 4 {
        let bit = usize::from(port);
        tss[TSS_SIZE as usize + bit / 8] &= !(1 << (bit % 8));
    }
    ram.write(TSS_ADDR, &tss)
}

/// The machine code of the stub for `vector`.
fn stub(vector: u8) -> Vec<u8> {
    let mut code = Vec::with_capacity(16);
    if !HAS_ERROR_CODE.contains(&vector) {
        code.extend_from_slice(&[0x6A, 0x00]); // push 0
    }
    code.extend_from_slice(&[0x6A, vector]); // push vector
    code.extend_from_slice(&[0xE6, PORT_FAULT as u8]); // out PORT_FAULT, al
    code.extend_from_slice(&[0xF4, 0xEB, 0xFD]); // hlt; jmp hlt
    code
}

fn write_stubs(ram: &GuestRam) -> Result<(), OutOfRange> {
    for vector in 0..VECTORS as u8 {
        ram.write(STUBS_ADDR + u64::from(vector) * 16, &stub(vector))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_fit_their_slots() {
        for v in 0..VECTORS as u8 {
            assert!(stub(v).len() <= 16);
        }
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let gdt = gdt_entries();
        let low = gdt[5];
        assert_eq!(low & 0xFFFF, u64::from(TSS_LIMIT));
        assert_eq!((low >> 16) & 0xFF_FFFF, TSS_ADDR);
        assert_eq!((low >> 40) & 0xFF, 0x8B);
    }
}
