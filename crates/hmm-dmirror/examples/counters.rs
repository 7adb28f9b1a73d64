//! Reading the counters: what one workload cost the process (`MmStats`), its device
//! mirror (`MirrorStats`), RAM (`PhysStats`) and device memory, step by step with
//! `since()`, as text and as JSON.
//!
//! ```text
//! cargo run -p hmm-dmirror --example counters
//! ```
//!
//! Every counter is cumulative; `since(&earlier)` gives what happened in between, so a
//! step is measured by a snapshot before and one after. `Display` prints the counters
//! that are not zero in words; every stats type is also `serde::Serialize`.

use std::error::Error;
use std::sync::Arc;

use hmm::addr::PAGE_SIZE;
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::NotifierEvent;
use hmm::phys::{PhysConfig, PhysMem};
use hmm_dmirror::{Dmirror, DmirrorConfig, DmirrorDriver};

fn main() -> Result<(), Box<dyn Error>> {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20))?;
    let driver = DmirrorDriver::new(&phys, DmirrorConfig::default());
    let mm = Mm::new(Arc::clone(&phys));
    let mirror = Dmirror::open(driver.device(0), &mm)?;

    let n = 512;
    let rw = Prot::READ | Prot::WRITE;
    let buf = mm.mmap(None, n * PAGE_SIZE, rw, MapFlags::PRIVATE)?;
    let out = mm.mmap(None, n * PAGE_SIZE, rw, MapFlags::PRIVATE)?;
    mm.write_slice(buf, &vec![0x5a5a_5a5a_u32; (n * PAGE_SIZE / 4) as usize])?;

    // Each step between two snapshots of every counter.
    let step = |what: &str, f: &dyn Fn() -> Result<(), Box<dyn Error>>| {
        let (m0, d0, p0) = (mm.stats(), mirror.stats(), phys.stats());
        f()?;
        let (m, d, p) = (
            mm.stats().since(&m0),
            mirror.stats().since(&d0),
            phys.stats().since(&p0),
        );
        println!("== {what}");
        println!("process:\n{m}");
        println!("mirror: {d}");
        println!(
            "RAM: {} frames allocated, {} freed; device memory in use: {} pages",
            p.nr_alloc_ops,
            p.nr_free_ops,
            driver.device(0).nr_in_use()
        );
        println!();
        Ok::<_, Box<dyn Error>>((m, d))
    };

    let (m, d) = step("migrate 2 MiB to device 0", &|| {
        mirror.migrate_to_dev(buf, n, out)?;
        Ok(())
    })?;
    assert_eq!(m.migrate.pages_migrated, n);
    assert_eq!(d.pages_copied_to_device, n);

    let (m, d) = step(
        "migrate it again (the seed series: no device invalidation)",
        &|| {
            mirror.migrate_to_dev(buf, n, out)?;
            Ok(())
        },
    )?;
    assert_eq!((m.migrate.pages_migrated, d.invalidations), (0, 0));
    assert_eq!(m.notifier.of(NotifierEvent::Migrate), 1);
    assert_eq!(d.migrate_skips, 1);

    let (m, _) = step("the CPU reads the first half back", &|| {
        let mut half = vec![0u32; (n * PAGE_SIZE / 8) as usize];
        mm.read_slice(buf, &mut half)?;
        assert!(half.iter().all(|&w| w == 0x5a5a_5a5a));
        Ok(())
    })?;
    assert_eq!(m.faults.device_private, n / 2);

    // The whole process's counters as JSON, keyed by the kernel's event names.
    println!("== everything, as JSON");
    println!("{}", serde_json::to_string_pretty(&mm.stats())?);
    Ok(())
}
