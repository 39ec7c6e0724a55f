//! virtio-balloon through the harness: inflate discards guest pages, deflate returns them,
//! statistics flow on request, the target reaches the guest as a config change.
mod common;

use std::time::Duration;

use common::rig;
use vcore::Snapshot;
use vdevices::virtio::balloon::{Balloon, DEFLATE_QUEUE, F_STATS_VQ, INFLATE_QUEUE, STATS_QUEUE};
use vdevices::virtio::mmio::{INT_CONFIG, reg};
use vm_memory::{Bytes, GuestAddress};

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

#[test]
fn inflate_deflate_stats_and_target() {
    let (balloon, handle) = Balloon::new();
    let mut r = rig(Box::new(balloon));
    let acked = r.driver.init(u64::MAX, 16).unwrap();
    assert!(acked & F_STATS_VQ != 0);
    let transport = r.driver.transport().clone();

    // The host sets a target: the guest sees a config change with the new num_pages.
    let gen0 = r.driver.read_reg(reg::CONFIG_GENERATION);
    handle.set_target(3);
    transport.config_changed();
    assert_eq!(r.driver.wait_interrupt(Duration::from_secs(2)) & INT_CONFIG, INT_CONFIG);
    assert_eq!(r.driver.read_reg(reg::CONFIG_GENERATION), gen0 + 1);
    assert_eq!(u32::from_le_bytes(r.driver.read_config(0, 4).try_into().unwrap()), 3);

    // Inflate 3 pages holding data (and one PFN far outside memory, ignored).
    let mem = r.driver.mem().clone();
    let pages = [0x900u32, 0x901, 0x902];
    for p in pages {
        mem.write_slice(&[0x5a; 4096], GuestAddress(u64::from(p) << 12)).unwrap();
    }
    let mut pfns = pages.to_vec();
    pfns.push(0xfff_ffff);
    r.driver.request(INFLATE_QUEUE, &[&pfn_bytes(&pfns)], &[]).unwrap();
    for p in pages {
        let v: u64 = mem.read_obj(GuestAddress(u64::from(p) << 12)).unwrap();
        assert_eq!(v, 0, "page {p:#x} was given back to the host");
    }
    r.driver.write_reg(reg::CONFIG + 4, 3); // actual
    let s = transport.save();
    let vdevices::DeviceState::Balloon(b) = &s.device else { panic!("not a balloon") };
    assert_eq!((b.inflated.clone(), b.actual_pages, b.bad_pfns), (pages.to_vec(), 3, 1));

    r.driver.request(DEFLATE_QUEUE, &[&pfn_bytes(&pages[..2])], &[]).unwrap();
    let vdevices::DeviceState::Balloon(b) = transport.save().device else { panic!("not a balloon") };
    assert_eq!(b.inflated, vec![0x902]);

    // Statistics: the guest posts a buffer, the device keeps it until asked again.
    let mut stats = Vec::new();
    for (tag, val) in [(4u16, 1000u64), (5, 2000)] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&val.to_le_bytes());
    }
    let p = r.driver.post(STATS_QUEUE, &[&stats], &[]).unwrap();
    r.driver.kick(STATS_QUEUE).unwrap();
    let t = std::time::Instant::now();
    while handle.stats_updates() == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(handle.stats(), vec![(4, 1000), (5, 2000)]);
    assert!(r.driver.wait(&p, Duration::from_millis(100)).is_err(), "buffer held until requested");
    handle.request_stats();
    transport.process_queue(STATS_QUEUE);
    r.driver.wait(&p, Duration::from_secs(2)).unwrap();

    // State round trip.
    let restored = Balloon::restore(
        (),
        match &transport.save().device {
            vdevices::DeviceState::Balloon(b) => b,
            _ => unreachable!(),
        },
    )
    .unwrap();
    assert_eq!(restored.inflated_pages(), 1);
    assert_eq!(restored.handle().target(), 3);
}

#[test]
fn free_page_reporting_discards_reported_ranges() {
    use vdevices::virtio::balloon::{F_PAGE_REPORTING, REPORTING_QUEUE};
    let (balloon, _handle) = Balloon::new();
    let mut r = rig(Box::new(balloon));
    let acked = r.driver.init(u64::MAX, 16).unwrap();
    assert!(acked & F_PAGE_REPORTING != 0);
    let mem = r.driver.mem().clone();
    // Two free ranges (2 MiB and one page), written with data first.
    let (a, b) = (0x40_0000u64, 0x70_0000u64);
    mem.write_slice(&vec![0x77; 2 << 20], GuestAddress(a)).unwrap();
    mem.write_slice(&[0x77; 4096], GuestAddress(b)).unwrap();
    mem.write_slice(&[0x77; 4096], GuestAddress(b + 4096)).unwrap(); // not reported: keeps data
    let head = r.driver.post_raw(REPORTING_QUEUE, &[(a, 2 << 20, 2), (b, 4096, 2)]).unwrap();
    r.driver.kick(REPORTING_QUEUE).unwrap();
    r.driver.wait_head(REPORTING_QUEUE, head, Duration::from_secs(5)).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    mem.read_slice(&mut buf, GuestAddress(a)).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "reported range reads as zeros");
    assert_eq!(mem.read_obj::<u64>(GuestAddress(b)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(b + 4096)).unwrap(), 0x77);
    let vdevices::DeviceState::Balloon(s) = r.driver.transport().save().device else {
        panic!("not a balloon")
    };
    assert_eq!(s.reported_bytes, (2 << 20) + 4096);
    // Restored, the device still knows which queue reports.
    let restored = Balloon::restore((), &s).unwrap();
    assert_eq!(restored.reported_bytes(), (2 << 20) + 4096);
}
