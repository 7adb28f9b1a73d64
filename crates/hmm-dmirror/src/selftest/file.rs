//! The device reading and writing a shared file mapping: `file_read`, `file_write`.

use hmm::mm::{MapFlags, MemFile, Prot};

use super::anon::buffer_pages;
use super::harness::{bytes, cmd, expect, fill, RW};
use super::{Fixture, Stop};
use crate::DmirrorCmd;

/// `hmm_create_file(size)`: an unnamed temporary file of `size` bytes (`O_TMPFILE`,
/// `ftruncate`).
pub(super) fn create_file(s: &Fixture, size: u64) -> Result<MemFile, Stop> {
    let file = MemFile::new(s.phys());
    check_ok!(file.truncate(size));
    Ok(file)
}

/// `TEST_F(hmm, file_read)`.
pub(super) fn file_read(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let file = create_file(s, size)?;
    let ints = size / 4;
    let mirror = check_ok!(s.mm.mmap(None, size, RW, MapFlags::PRIVATE));

    // The file's initial contents, written through the mirror buffer.
    fill(&s.mm, mirror, 0..ints, |i| i as i32)?;
    let len = check_ok!(file.pwrite(0, &bytes(&s.mm, mirror, size)?));
    check_eq!(len as u64, size);
    check_ok!(s.mm.write(mirror, &vec![0; size as usize]));
    check_ok!(s.mm.munmap(mirror, size));

    let ptr = check_ok!(s
        .mm
        .mmap_file(None, size, Prot::READ, MapFlags::SHARED, &file, 0));
    let mut b = s.buffer(ptr, size, size, 0)?;
    let ret = cmd(s.fd(), DmirrorCmd::Read, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    check_eq!(b.faults, 1);
    expect(&s.mm, "mirror", b.mirror, 0..ints, |i| i as i32)?;
    s.free(b)
}

/// `TEST_F(hmm, file_write)`.
pub(super) fn file_write(s: &mut Fixture) -> Result<(), Stop> {
    let (npages, size) = buffer_pages(s)?;
    let file = create_file(s, size)?;
    let ints = size / 4;
    let ptr = check_ok!(s.mm.mmap_file(None, size, RW, MapFlags::SHARED, &file, 0));
    let mut b = s.buffer(ptr, size, size, 0)?;
    fill(&s.mm, b.mirror, 0..ints, |i| i as i32)?;

    let ret = cmd(s.fd(), DmirrorCmd::Write, &mut b, npages);
    check_eq!(ret, 0);
    check_eq!(b.cpages, npages);
    check_eq!(b.faults, 1);
    expect(&s.mm, "ptr", b.ptr, 0..ints, |i| i as i32)?;

    // The device also wrote the file.
    let mut back = vec![0u8; size as usize];
    let len = check_ok!(file.pread(0, &mut back));
    check_eq!(len as u64, size);
    for (i, w) in back.chunks_exact(4).enumerate() {
        let got = i32::from_le_bytes(w.try_into().expect("4 bytes"));
        if got != i as i32 {
            return Err(Stop::Fail(format!("Expected file[{i}] ({got}) == {i}")));
        }
    }
    s.free(b)
}
