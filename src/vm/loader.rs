//! Guest program images: ELF validation and loading.
//!
//! The file is untrusted. Everything is validated when the program is
//! created ([`GuestProgram::from_bytes`]) and again against the memory size
//! before any VM exists, so a malformed image is an [`InvalidGuest`] error
//! and never a fault in the host.

use std::path::Path;
use std::sync::Arc;

use elf::abi::{EM_X86_64, ET_EXEC, PF_X, PT_DYNAMIC, PT_INTERP, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::Class;
use elf::ElfBytes;
use sha2::Digest;

use super::error::InvalidGuest;
use crate::abi::{HUGE_PAGE_SIZE, PAGE_SIZE, USER_BASE};
use crate::sys::memory::GuestRam;

/// Most loadable segments accepted.
const MAX_SEGMENTS: usize = 64;

/// Smallest heap a guest gets; memory too small for image + this is rejected.
pub(crate) const MIN_HEAP: u64 = HUGE_PAGE_SIZE;

#[derive(Debug, Clone)]
struct Segment {
    vaddr: u64,
    offset: usize,
    file_size: usize,
}

#[derive(Debug)]
struct Image {
    digest: [u8; 32],
    bytes: Vec<u8>,
    segments: Vec<Segment>,
    entry: u64,
    image_end: u64,
}

/// A validated guest program: a static, non-PIE x86-64 ELF executable
/// linked against `snapvm-guest`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GuestProgram {
    image: Arc<Image>,
}

impl GuestProgram {
    /// Reads and validates the ELF file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, InvalidGuest> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| InvalidGuest::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(bytes)
    }

    /// Validates an ELF image held in memory.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Self, InvalidGuest> {
        let bytes = bytes.into();
        let parsed = parse(&bytes)?;
        Ok(Self {
            image: Arc::new(Image {
                digest: sha2::Sha256::digest(&bytes).into(),
                bytes,
                ..parsed
            }),
        })
    }

    /// SHA-256 of the ELF file: snapshots record it, and restoring checks
    /// that the config runs the same program.
    pub fn digest(&self) -> &[u8; 32] {
        &self.image.digest
    }

    /// The entry point address.
    pub fn entry(&self) -> u64 {
        self.image.entry
    }

    /// One past the highest address the image occupies, page-aligned.
    pub fn image_end(&self) -> u64 {
        self.image.image_end
    }

    /// Checks that the image fits in `memory_size` bytes with a minimal heap.
    pub(crate) fn check_fits(&self, memory_size: u64) -> Result<(), InvalidGuest> {
        match self.image.image_end.checked_add(MIN_HEAP) {
            Some(end) if end <= memory_size => Ok(()),
            _ => Err(InvalidGuest::TooLarge {
                image_end: self.image.image_end,
                memory_size,
            }),
        }
    }

    /// Copies the segments into guest memory (which must be zeroed and large
    /// enough: see [`Self::check_fits`]).
    pub(crate) fn load(&self, ram: &GuestRam) -> Result<(), InvalidGuest> {
        for seg in &self.image.segments {
            let data = &self.image.bytes[seg.offset..seg.offset + seg.file_size];
            ram.write(seg.vaddr, data)
                .map_err(|_| InvalidGuest::TooLarge {
                    image_end: self.image.image_end,
                    memory_size: ram.size(),
                })?;
        }
        Ok(())
    }
}

fn parse(bytes: &[u8]) -> Result<Image, InvalidGuest> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(bytes).map_err(InvalidGuest::Parse)?;
    let ehdr = &file.ehdr;
    if ehdr.class != Class::ELF64 {
        return Err(InvalidGuest::Parse(elf::ParseError::UnsupportedElfClass(1)));
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(InvalidGuest::WrongMachine {
            machine: ehdr.e_machine,
        });
    }
    if ehdr.e_type != ET_EXEC {
        return Err(InvalidGuest::NotStaticExecutable {
            elf_type: ehdr.e_type,
        });
    }
    let table = file.segments().ok_or(InvalidGuest::SegmentCount {
        count: 0,
        max: MAX_SEGMENTS,
    })?;
    let mut segments = Vec::new();
    let mut entry_ok = false;
    let mut image_end = USER_BASE;
    for (index, ph) in table.iter().enumerate() {
        match ph.p_type {
            PT_INTERP => {
                return Err(InvalidGuest::Dynamic {
                    segment: "PT_INTERP",
                })
            }
            PT_DYNAMIC => {
                return Err(InvalidGuest::Dynamic {
                    segment: "PT_DYNAMIC",
                })
            }
            PT_LOAD => {}
            _ => continue,
        }
        if segments.len() == MAX_SEGMENTS {
            return Err(InvalidGuest::SegmentCount {
                count: table.len(),
                max: MAX_SEGMENTS,
            });
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(InvalidGuest::SegmentSizes {
                index,
                file_size: ph.p_filesz,
                mem_size: ph.p_memsz,
            });
        }
        let file_range = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .filter(|&end| end <= bytes.len() as u64);
        if file_range.is_none() {
            return Err(InvalidGuest::SegmentOutsideFile {
                index,
                offset: ph.p_offset,
                size: ph.p_filesz,
                file_len: bytes.len(),
            });
        }
        let out_of_range = InvalidGuest::SegmentOutOfRange {
            index,
            vaddr: ph.p_vaddr,
            size: ph.p_memsz,
            min: USER_BASE,
        };
        if ph.p_vaddr < USER_BASE {
            return Err(out_of_range);
        }
        // Page-align the end; reject ends that overflow or exceed a sane
        // address space (64 GiB, the largest guest snapvm builds).
        let end = ph
            .p_vaddr
            .checked_add(ph.p_memsz)
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
            .filter(|&e| e <= super::config::MAX_MEMORY_SIZE)
            .ok_or(out_of_range)?;
        image_end = image_end.max(end);
        if ph.p_flags & PF_X != 0 && (ph.p_vaddr..ph.p_vaddr + ph.p_memsz).contains(&ehdr.e_entry) {
            entry_ok = true;
        }
        segments.push(Segment {
            vaddr: ph.p_vaddr,
            offset: ph.p_offset as usize,
            file_size: ph.p_filesz as usize,
        });
    }
    if segments.is_empty() {
        return Err(InvalidGuest::SegmentCount {
            count: 0,
            max: MAX_SEGMENTS,
        });
    }
    if !entry_ok {
        return Err(InvalidGuest::BadEntry {
            entry: ehdr.e_entry,
        });
    }
    Ok(Image {
        digest: [0; 32],
        bytes: Vec::new(),
        segments,
        entry: ehdr.e_entry,
        image_end,
    })
}
