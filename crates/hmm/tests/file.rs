//! In-memory files: shared and private mappings, pread/pwrite coherent with them, copy on
//! write of file pages, truncation with its CLEAR events and SIGBUS past the end, and fork.

mod common;

use common::{page, Machine, RW};
use hmm::addr::PAGE_SIZE;
use hmm::mm::{FaultError, MapFlags, MemFile, MmError, Prot, VmaKind};
use hmm::notifier::NotifierEvent;

fn file_with(m: &Machine, pages: u64) -> MemFile {
    let f = MemFile::new(&m.phys);
    for i in 0..pages {
        f.pwrite(i * PAGE_SIZE, &(0xf000 + i).to_le_bytes())
            .unwrap();
    }
    f
}

#[test]
fn shared_mapping_and_file_io_see_the_same_bytes() {
    let m = Machine::new(16);
    let f = file_with(&m, 4);
    assert_eq!(f.size(), 3 * PAGE_SIZE + 8);
    let a =
        m.mm.mmap_file(None, 4 * PAGE_SIZE, RW, MapFlags::SHARED, &f, 0)
            .unwrap();
    assert_eq!(m.mm.vmas()[0].kind(), VmaKind::FileShared);
    assert_eq!(m.mm.read_val::<u64>(page(a, 2)).unwrap(), 0xf002);
    m.mm.write_val(page(a, 1), 7u64).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(f.pread(PAGE_SIZE, &mut b).unwrap(), 8);
    assert_eq!(u64::from_le_bytes(b), 7);
    f.pwrite(2 * PAGE_SIZE + 8, &9u64.to_le_bytes()).unwrap();
    assert_eq!(
        m.mm.read_val::<u64>(page(a, 2).checked_add(8).unwrap())
            .unwrap(),
        9
    );
    // No copies: the mapping maps the page-cache pages.
    assert_eq!(m.phys.nr_in_use(), 4);
    assert_eq!(m.mm.stats().faults.cow, 0);
    assert!(m.mm.pagemap(page(a, 1), 1).unwrap()[0].file);
    m.mm.audit().unwrap();
}

#[test]
fn private_mapping_copies_on_write_and_sees_the_file_until_then() {
    let m = Machine::new(16);
    let f = file_with(&m, 2);
    let a =
        m.mm.mmap_file(None, 2 * PAGE_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    assert_eq!(m.mm.vmas()[0].kind(), VmaKind::FilePrivate);
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 0xf000);
    // A file write shows through the not-yet-copied page (Linux behaviour).
    f.pwrite(0, &1u64.to_le_bytes()).unwrap();
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 1);
    m.events();
    m.mm.write_val(a, 2u64).unwrap();
    assert_eq!(
        m.events(),
        [(NotifierEvent::Clear, a.as_u64(), page(a, 1).as_u64())]
    );
    let mut b = [0u8; 8];
    f.pread(0, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 1, "the file keeps its bytes");
    assert!(
        !m.mm.pagemap(a, 1).unwrap()[0].file,
        "now an anonymous copy"
    );
    // A first-touch write copies straight away (do_cow_fault), no read-only step.
    m.mm.write_val(page(a, 1), 3u64).unwrap();
    f.pread(PAGE_SIZE, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0xf001);
    assert_eq!(m.mm.stats().faults.cow, 2);
    // Fork shares both the copy and the file page copy-on-write.
    let child = m.mm.fork().unwrap();
    child.write_val(a, 4u64).unwrap();
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 2);
    m.mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn offsets_and_sigbus_past_the_end() {
    let m = Machine::new(16);
    let f = file_with(&m, 3);
    let a =
        m.mm.mmap_file(
            None,
            4 * PAGE_SIZE,
            Prot::READ,
            MapFlags::SHARED,
            &f,
            PAGE_SIZE,
        )
        .unwrap();
    assert_eq!(m.mm.read_val::<u64>(a).unwrap(), 0xf001);
    assert_eq!(m.mm.read_val::<u64>(page(a, 1)).unwrap(), 0xf002);
    assert_eq!(
        m.mm.read_val::<u64>(page(a, 2)),
        Err(FaultError::Bus { addr: page(a, 2) })
    );
    // Growing the file makes the page reachable; the new part reads as zeros.
    f.truncate(5 * PAGE_SIZE).unwrap();
    assert_eq!(m.mm.read_val::<u64>(page(a, 3)).unwrap(), 0);
    assert!(matches!(
        m.mm.mmap_file(None, PAGE_SIZE, Prot::READ, MapFlags::SHARED, &f, 1),
        Err(MmError::Inval { .. })
    ));
    assert!(matches!(
        m.mm.mmap_file(None, PAGE_SIZE, Prot::READ, MapFlags::SHARED, &f, !4095),
        Err(MmError::Inval { .. })
    ));
    assert!(f.pwrite(u64::MAX - 2, &[1, 2, 3]).is_err());
    assert!(f.truncate(u64::MAX).is_err());
    assert_eq!(f.pread(100 * PAGE_SIZE, &mut [0u8; 8]).unwrap(), 0);
    assert!(matches!(
        f.pread(u64::MAX - 4, &mut [0u8; 8]),
        Err(MmError::Inval { .. })
    ));
    m.mm.audit().unwrap();
}

#[test]
fn truncate_zaps_every_mapping_and_private_copies() {
    let m = Machine::new(16);
    let f = file_with(&m, 4);
    let shared =
        m.mm.mmap_file(None, 4 * PAGE_SIZE, RW, MapFlags::SHARED, &f, 0)
            .unwrap();
    let private =
        m.mm.mmap_file(None, 4 * PAGE_SIZE, RW, MapFlags::PRIVATE, &f, 0)
            .unwrap();
    let child = m.mm.fork().unwrap();
    for i in 0..4 {
        m.mm.read_val::<u8>(page(shared, i)).unwrap();
        child.read_val::<u8>(page(shared, i)).unwrap();
    }
    m.mm.write_val(page(private, 3), 1u8).unwrap();
    m.events();
    f.truncate(PAGE_SIZE + 100).unwrap();
    // CLEAR for pages 2.. of each mapping in this address space.
    let ev = m.events();
    assert!(ev.contains(&(
        NotifierEvent::Clear,
        page(shared, 2).as_u64(),
        page(shared, 4).as_u64()
    )));
    assert!(ev.contains(&(
        NotifierEvent::Clear,
        page(private, 2).as_u64(),
        page(private, 4).as_u64()
    )));
    for mm in [&m.mm, &child] {
        assert_eq!(
            mm.read_val::<u8>(page(shared, 2)),
            Err(FaultError::Bus {
                addr: page(shared, 2)
            })
        );
        assert_eq!(
            mm.read_val::<u8>(page(private, 3)),
            Err(FaultError::Bus {
                addr: page(private, 3)
            })
        );
        mm.audit().unwrap();
    }
    // The tail of the last page is zeroed; what is before it is kept.
    let at = page(shared, 1);
    assert_eq!(m.mm.read_val::<u64>(at).unwrap(), 0xf001);
    assert_eq!(
        m.mm.read_val::<u8>(at.checked_add(100).unwrap()).unwrap(),
        0
    );
    assert_eq!(f.nr_cached_pages(), 2);
    drop(child);
    drop(m);
    drop(f);
}

#[test]
fn file_pages_return_when_the_file_and_mappings_go() {
    let m = Machine::new(16);
    let f = file_with(&m, 8);
    let a =
        m.mm.mmap_file(None, 8 * PAGE_SIZE, RW, MapFlags::SHARED, &f, 0)
            .unwrap();
    for i in 0..8 {
        m.mm.read_val::<u8>(page(a, i)).unwrap();
    }
    let phys = m.phys.clone();
    assert_eq!(phys.nr_in_use(), 8);
    drop(f);
    assert_eq!(phys.nr_in_use(), 8, "mapped: the VMA holds the file");
    m.mm.munmap(a, 8 * PAGE_SIZE).unwrap();
    assert_eq!(phys.nr_in_use(), 0);
}
