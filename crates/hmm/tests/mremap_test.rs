//! The kernel's `tools/testing/selftests/mm/mremap_test.c` (mainline, with the 6.17
//! multi-VMA cases), ported: moves between regions of every alignment (PTE, 1 MiB, PMD,
//! PUD) with the byte pattern checked after each, the expected failures, merges on
//! expansion, moves inside a range, shrinks and moves across several VMAs and holes. One
//! test per case (the region configurations as one test, each named on failure), at the
//! C's default validation threshold (4 MiB of each region checked; the 1 GiB timing cases
//! run only without a threshold, so they do not run here either).
//!
//! `/proc/self/maps` is [`Mm::vmas`](hmm::mm::Mm::vmas); the random pattern comes from a
//! seeded generator instead of `rand()`.

mod common;

use common::{page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, MmError, MremapFlags, Prot, MMAP_MIN_ADDR};

const KB: u64 = 1 << 10;
const MB: u64 = 1 << 20;
const GB: u64 = 1 << 30;
const PTE: u64 = PAGE_SIZE;
const PMD: u64 = 2 * MB;
const PUD: u64 = GB;
/// `VALIDATION_DEFAULT_THRESHOLD`.
const THRESHOLD: u64 = 4 * MB;
const FIXED: MremapFlags = MremapFlags::MAYMOVE.union(MremapFlags::FIXED);

/// The pattern `srand(seed); rand()...` stands for: `len` pseudo-random bytes.
fn rand_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

fn bytes(m: &Machine, a: VirtAddr, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    m.mm.read(a, &mut b).unwrap();
    b
}

/// `is_range_mapped`: one VMA covers `[start, end)`.
fn is_range_mapped(m: &Machine, start: VirtAddr, end: VirtAddr) -> bool {
    m.mm.vmas()
        .iter()
        .any(|v| v.start() <= start && v.end() >= end)
}

/// `struct config`.
#[derive(Debug, Clone, Copy)]
struct Config {
    src_alignment: u64,
    dest_alignment: u64,
    region_size: u64,
    overlapping: bool,
    dest_preamble_size: u64,
}

/// `get_source_mapping`: a shared anonymous region at the first address above
/// `mmap_min_addr` + 40 MiB that is aligned to `src_alignment` but not to twice it.
fn get_source_mapping(m: &Machine, c: Config) -> Option<VirtAddr> {
    let min = MMAP_MIN_ADDR + 10 * THRESHOLD;
    let mut addr = 0u64;
    loop {
        addr = addr.checked_add(c.src_alignment)?;
        if addr < min {
            continue;
        }
        let flags = MapFlags::SHARED | MapFlags::FIXED_NOREPLACE;
        match m
            .mm
            .mmap(Some(VirtAddr::new(addr)), c.region_size, RW, flags)
        {
            Ok(a) if a.as_u64() & c.src_alignment != 0 => return Some(a),
            Ok(a) => m.mm.munmap(a, c.region_size).unwrap(),
            Err(MmError::Perm { .. } | MmError::Exists { .. }) => {}
            Err(_) => return None,
        }
    }
}

/// `is_remap_region_valid`: nothing is mapped at `[addr, addr + size)`.
fn is_remap_region_valid(m: &Machine, addr: VirtAddr, size: u64) -> bool {
    let flags = MapFlags::SHARED | MapFlags::FIXED_NOREPLACE;
    match m.mm.mmap(Some(addr), size, RW, flags) {
        Ok(a) => {
            m.mm.munmap(a, size).unwrap();
            true
        }
        Err(MmError::Exists { .. }) => false,
        Err(_) => true,
    }
}

/// `remap_region`: `Ok` if the move succeeded and every checked byte (and the
/// destination's preamble) is right.
fn remap_region(c: Config, rand: &[u8]) -> Result<(), String> {
    let m = Machine::new(64);
    let threshold = THRESHOLD.min(c.region_size);
    let src = get_source_mapping(&m, c).ok_or("failed to map the source region")?;
    m.mm.write(src, &rand[..threshold as usize]).unwrap();
    let offset = if c.overlapping {
        src.as_u64() + c.region_size - c.dest_alignment
    } else {
        src.as_u64() + c.region_size + c.dest_alignment
    };
    let mut addr = (offset & !(c.dest_alignment - 1)) + c.dest_preamble_size;
    if addr & c.dest_alignment == 0 {
        addr |= c.dest_alignment;
    }
    while !c.overlapping && !is_remap_region_valid(&m, VirtAddr::new(addr), c.region_size) {
        addr += c.dest_alignment;
    }
    if c.dest_preamble_size != 0 {
        let at = VirtAddr::new(addr - c.dest_preamble_size);
        let flags = MapFlags::SHARED | MapFlags::FIXED_NOREPLACE;
        let pre =
            m.mm.mmap(Some(at), c.dest_preamble_size, RW, flags)
                .unwrap();
        m.mm.write(pre, &rand[..c.dest_preamble_size as usize])
            .unwrap();
    }
    let dest =
        m.mm.mremap(
            src,
            c.region_size,
            c.region_size,
            FIXED,
            Some(VirtAddr::new(addr)),
        )
        .map_err(|e| format!("mremap failed: {e}"))?;
    if bytes(&m, dest, threshold) != rand[..threshold as usize] {
        return Err("data after remap doesn't match".into());
    }
    if c.dest_preamble_size != 0 {
        let pre = VirtAddr::new(addr - c.dest_preamble_size);
        if bytes(&m, pre, c.dest_preamble_size) != rand[..c.dest_preamble_size as usize] {
            return Err("preamble data after remap doesn't match".into());
        }
    }
    m.mm.audit().unwrap();
    Ok(())
}

#[test]
fn remap_region_cases() {
    let rand = rand_bytes(1, 10 * THRESHOLD);
    let t = |src, dest, size, overlapping, fail: bool, name: &'static str| {
        let c = Config {
            src_alignment: src,
            dest_alignment: dest,
            region_size: size,
            overlapping,
            dest_preamble_size: 0,
        };
        (c, fail, name)
    };
    let mut cases = vec![
        t(
            PTE,
            PTE,
            PTE,
            true,
            true,
            "mremap - Source and Destination Regions Overlapping",
        ),
        t(
            PTE,
            PTE / 4,
            PTE,
            false,
            true,
            "mremap - Destination Address Misaligned (1KB-aligned)",
        ),
        t(
            PTE / 4,
            PTE,
            PTE,
            false,
            true,
            "mremap - Source Address Misaligned (1KB-aligned)",
        ),
        t(
            PTE,
            PTE,
            PTE * 2,
            false,
            false,
            "8KB mremap - Source PTE-aligned, Destination PTE-aligned",
        ),
        t(
            MB,
            PTE,
            2 * MB,
            false,
            false,
            "2MB mremap - Source 1MB-aligned, Destination PTE-aligned",
        ),
        t(
            MB,
            MB,
            2 * MB,
            false,
            false,
            "2MB mremap - Source 1MB-aligned, Destination 1MB-aligned",
        ),
        t(
            PMD,
            PTE,
            4 * MB,
            false,
            false,
            "4MB mremap - Source PMD-aligned, Destination PTE-aligned",
        ),
        t(
            PMD,
            MB,
            4 * MB,
            false,
            false,
            "4MB mremap - Source PMD-aligned, Destination 1MB-aligned",
        ),
        t(
            PMD,
            PMD,
            4 * MB,
            false,
            false,
            "4MB mremap - Source PMD-aligned, Destination PMD-aligned",
        ),
        t(
            PUD,
            PTE,
            2 * GB,
            false,
            false,
            "2GB mremap - Source PUD-aligned, Destination PTE-aligned",
        ),
        t(
            PUD,
            MB,
            2 * GB,
            false,
            false,
            "2GB mremap - Source PUD-aligned, Destination 1MB-aligned",
        ),
        t(
            PUD,
            PMD,
            2 * GB,
            false,
            false,
            "2GB mremap - Source PUD-aligned, Destination PMD-aligned",
        ),
        t(
            PUD,
            PUD,
            2 * GB,
            false,
            false,
            "2GB mremap - Source PUD-aligned, Destination PUD-aligned",
        ),
        t(
            MB,
            MB,
            5 * MB,
            false,
            false,
            "5MB mremap - Source 1MB-aligned, Destination 1MB-aligned",
        ),
        t(
            MB,
            MB,
            5 * MB,
            false,
            false,
            "5MB mremap - Source 1MB-aligned, Dest 1MB-aligned with 40MB Preamble",
        ),
    ];
    cases[14].0.dest_preamble_size = 10 * THRESHOLD;
    let failed: Vec<String> = cases
        .into_iter()
        .filter_map(|(c, expect_failure, name)| match remap_region(c, &rand) {
            Ok(()) if expect_failure => Some(format!("{name}: succeeded, expected to fail")),
            Err(why) if !expect_failure => Some(format!("{name}: {why}")),
            _ => None,
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn mremap_expand_merge() {
    let m = Machine::new(16);
    let start = m.map(3, RW, MapFlags::PRIVATE);
    m.mm.munmap(page(start, 1), PAGE_SIZE).unwrap();
    m.mm.mremap(start, PAGE_SIZE, 2 * PAGE_SIZE, MremapFlags::empty(), None)
        .unwrap();
    assert!(is_range_mapped(&m, start, page(start, 3)));
}

#[test]
fn mremap_expand_merge_offset() {
    let m = Machine::new(16);
    let start = m.map(3, RW, MapFlags::PRIVATE);
    m.mm.munmap(page(start, 2), PAGE_SIZE).unwrap();
    m.mm.mremap(
        page(start, 1),
        PAGE_SIZE,
        2 * PAGE_SIZE,
        MremapFlags::empty(),
        None,
    )
    .unwrap();
    assert!(is_range_mapped(&m, start, page(start, 3)));
}

#[test]
fn mremap_move_within_range() {
    let m = Machine::new(64);
    let rand = rand_bytes(2, 2 * MB);
    let size = 20 * MB;
    let ptr = m.mm.mmap(None, size, RW, MapFlags::PRIVATE).unwrap();
    m.mm.write(ptr, &vec![0; size as usize]).unwrap();
    let src = VirtAddr::new((ptr.as_u64() + 6 * MB) & !(2 * MB - 1));
    m.mm.write(src, &rand).unwrap();
    let dest = src - 2 * MB;
    m.mm.mremap(src + MB, MB, MB, FIXED, Some(dest + MB))
        .unwrap();
    assert_eq!(
        bytes(&m, src, MB),
        rand[..MB as usize],
        "data at src got corrupted due to unrelated mremap"
    );
    m.mm.audit().unwrap();
}

#[test]
fn mremap_move_1mb_from_start() {
    let m = Machine::new(64);
    let rand = rand_bytes(3, 2 * MB);
    let c = Config {
        src_alignment: MB + 256 * KB,
        dest_alignment: 0,
        region_size: 6 * MB,
        overlapping: false,
        dest_preamble_size: 0,
    };
    let src = get_source_mapping(&m, c).unwrap();
    let dest = get_source_mapping(&m, c).unwrap();
    m.mm.write(src, &rand).unwrap();
    m.mm.munmap(dest, MB).unwrap();
    m.mm.mremap(src + MB, MB, MB, FIXED, Some(dest + MB))
        .unwrap();
    assert_eq!(
        bytes(&m, src, MB),
        rand[..MB as usize],
        "data at src got corrupted due to unrelated mremap"
    );
    m.mm.audit().unwrap();
}

/// Maps `pages` pages and a free target twice as large, then unmaps the source's pages
/// `unmap`.
fn holes(m: &Machine, pages: u64, unmap: &[u64]) -> (VirtAddr, VirtAddr) {
    let ptr = m.map(pages, RW, MapFlags::PRIVATE);
    let tgt = m.map(2 * pages, RW, MapFlags::PRIVATE);
    m.mm.munmap(tgt, 2 * pages * PAGE_SIZE).unwrap();
    for &i in unmap {
        m.mm.munmap(page(ptr, i), PAGE_SIZE).unwrap();
    }
    (ptr, tgt)
}

fn mremap_shrink_multiple_vmas(inplace: bool) {
    let m = Machine::new(16);
    let size = 10 * PAGE_SIZE;
    // |*| |*| |*| |*| |*|: the odd pages unmapped.
    let (ptr, tgt) = holes(&m, 10, &[1, 3, 5, 7, 9]);
    let r = if inplace {
        m.mm.mremap(ptr, size, PAGE_SIZE, MremapFlags::empty(), None)
    } else {
        m.mm.mremap(ptr, size, PAGE_SIZE, FIXED, Some(tgt))
    };
    assert!(r.is_ok(), "inplace={inplace}: {r:?}");
    m.mm.audit().unwrap();
}

#[test]
fn mremap_shrink_multiple_vmas_inplace() {
    mremap_shrink_multiple_vmas(true);
}

#[test]
fn mremap_shrink_multiple_vmas_moved() {
    mremap_shrink_multiple_vmas(false);
}

/// `is_multiple_vma_range_ok`: pages 0, 2, 4-5, 6, 8, 10 hold the pattern, in order.
fn multiple_vma_range_ok(m: &Machine, ptr: VirtAddr, rand: &[u8]) -> bool {
    let mut at = 0usize;
    for i in (0..=10).step_by(2) {
        let len = if i == 4 { 2 * PAGE_SIZE } else { PAGE_SIZE };
        if bytes(m, page(ptr, i), len) != rand[at..at + len as usize] {
            return false;
        }
        at += len as usize;
    }
    true
}

fn mremap_move_multiple_vmas(dont_unmap: bool) {
    let m = Machine::new(16);
    let rand = rand_bytes(4, 7 * PAGE_SIZE);
    let mut flags = FIXED;
    if dont_unmap {
        flags |= MremapFlags::DONTUNMAP;
    }
    let size = 11 * PAGE_SIZE;
    // |*| |*| |*****| |*| |*|: pages 1, 3, 7 and 9 unmapped.
    let (ptr, tgt) = holes(&m, 11, &[1, 3, 7, 9]);
    let mut at = 0usize;
    for i in (0..=10).step_by(2) {
        let len = if i == 4 { 2 * PAGE_SIZE } else { PAGE_SIZE } as usize;
        m.mm.write(page(ptr, i), &rand[at..at + len]).unwrap();
        at += len;
    }
    // Move the whole thing.
    assert_eq!(m.mm.mremap(ptr, size, size, flags, Some(tgt)), Ok(tgt));
    assert!(multiple_vma_range_ok(&m, tgt, &rand), "first move");
    // Move next to itself.
    let next = tgt + size;
    assert_eq!(m.mm.mremap(tgt, size, size, flags, Some(next)), Ok(next));
    assert!(
        multiple_vma_range_ok(&m, next, &rand),
        "move next to itself"
    );
    // Map a range to overwrite, then move over it.
    let fixed = MapFlags::PRIVATE | MapFlags::FIXED;
    m.mm.mmap(Some(tgt), size, Prot::NONE, fixed).unwrap();
    assert_eq!(m.mm.mremap(next, size, size, flags, Some(tgt)), Ok(tgt));
    assert!(multiple_vma_range_ok(&m, tgt, &rand), "move and overwrite");
    m.mm.audit().unwrap();
}

#[test]
fn mremap_move_multiple_vmas_plain() {
    mremap_move_multiple_vmas(false);
}

#[test]
fn mremap_move_multiple_vmas_dontunmap() {
    mremap_move_multiple_vmas(true);
}

fn mremap_move_multiple_vmas_split(dont_unmap: bool) {
    let m = Machine::new(16);
    let mut flags = FIXED;
    if dont_unmap {
        flags |= MremapFlags::DONTUNMAP;
    }
    let size = 10 * PAGE_SIZE;
    let ptr = m.map(10, RW, MapFlags::PRIVATE);
    let tgt = m.map(10, RW, MapFlags::PRIVATE);
    m.mm.munmap(tgt, size).unwrap();
    m.mm.munmap(page(ptr, 5), PAGE_SIZE).unwrap();
    let rand = rand_bytes(5, size);
    for i in (0..10).filter(|&i| i != 5) {
        let at = (i * PAGE_SIZE) as usize;
        m.mm.write(page(ptr, i), &rand[at..at + PAGE_SIZE as usize])
            .unwrap();
    }
    // Pages 2..9 of the source (a hole at 5) land at pages 0..7 of the target.
    let len = size - 3 * PAGE_SIZE;
    assert_eq!(
        m.mm.mremap(page(ptr, 2), len, len, flags, Some(tgt)),
        Ok(tgt)
    );
    for i in (0..7).filter(|&i| i != 3) {
        let at = ((i + 2) * PAGE_SIZE) as usize;
        assert_eq!(
            bytes(&m, page(tgt, i), PAGE_SIZE),
            rand[at..at + PAGE_SIZE as usize],
            "page {i} corrupted"
        );
    }
    assert!(
        m.mm.read_val::<u8>(page(tgt, 3)).is_err(),
        "the hole moved as a hole"
    );
    m.mm.audit().unwrap();
}

#[test]
fn mremap_move_multiple_vmas_split_plain() {
    mremap_move_multiple_vmas_split(false);
}

#[test]
fn mremap_move_multiple_vmas_split_dontunmap() {
    mremap_move_multiple_vmas_split(true);
}

/// `mremap_move_multi_invalid_vmas` (Linux 6.17): a userfaultfd-armed VMA cannot be part
/// of a move over several VMAs (`EFAULT`); the VMAs before it move, none if it is the
/// first; one armed VMA alone moves.
#[test]
fn mremap_move_multiple_invalid_vmas() {
    use hmm::mm::userfaultfd::{RegisterMode, UffdFeatures, Userfaultfd};
    let m = Machine::new(16);
    let size = 10 * PAGE_SIZE;
    let uffd = Userfaultfd::new(&m.mm, UffdFeatures::empty()).unwrap();
    let ptr = m.map(10, RW, MapFlags::PRIVATE);
    let tgt = m.map(10, Prot::NONE, MapFlags::PRIVATE);
    m.mm.munmap(tgt, size).unwrap();
    let mapped = |at: VirtAddr| m.mm.vmas().iter().any(|v| v.range().contains(at));
    // |*| |*| |*| |*| |*|, each page registered with the userfaultfd.
    for i in (0..10).step_by(2) {
        uffd.register(page(ptr, i), PAGE_SIZE, RegisterMode::MISSING)
            .unwrap();
        m.mm.munmap(page(ptr, i + 1), PAGE_SIZE).unwrap();
    }
    // The whole range: fails, and nothing moved (the first VMA is checked first).
    assert_eq!(
        m.mm.mremap(ptr, size, size, FIXED, Some(tgt)),
        Err(MmError::Fault { addr: ptr })
    );
    assert!(
        !mapped(tgt),
        "invalid uffd-armed VMA at start of multi range moved"
    );
    // A single VMA moves.
    assert_eq!(
        m.mm.mremap(ptr, PAGE_SIZE, PAGE_SIZE, FIXED, Some(tgt)),
        Ok(tgt)
    );
    // A valid VMA first: it moves, the next fails.
    m.mm.munmap(tgt, PAGE_SIZE).unwrap();
    let fixed = MapFlags::PRIVATE | MapFlags::FIXED;
    m.mm.mmap(Some(ptr), PAGE_SIZE, RW, fixed).unwrap();
    assert!(matches!(
        m.mm.mremap(ptr, size, size, FIXED, Some(tgt)),
        Err(MmError::Fault { .. })
    ));
    assert!(mapped(tgt), "valid VMA not moved");
    // Four valid VMAs and an armed one last: four move.
    m.mm.munmap(tgt, PAGE_SIZE).unwrap();
    m.mm.munmap(ptr, size - 2 * PAGE_SIZE).unwrap();
    for i in (0..8).step_by(2) {
        m.mm.mmap(Some(page(ptr, i)), PAGE_SIZE, RW, fixed).unwrap();
    }
    assert!(matches!(
        m.mm.mremap(ptr, size, size, FIXED, Some(tgt)),
        Err(MmError::Fault { .. })
    ));
    for i in (0..10).step_by(2) {
        assert_eq!(mapped(page(tgt, i)), i < 8, "VMA at {i}");
    }
    m.mm.audit().unwrap();
}
